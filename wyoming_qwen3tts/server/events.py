"""Reading Wyoming events with limits.

`wyoming.event.async_read_event` trusts the peer: it reads whatever `data_length` and
`payload_length` announce, lets a non-object header raise an unrelated exception, and turns
every malformed event into a silent disconnect. A server on the network needs limits and a
reason it can log, so events are parsed here (same wire format, same `wyoming.event.Event`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from wyoming.event import Event


class ProtocolError(Exception):
    """The peer sent something that is not a well-formed Wyoming event."""


# asyncio's default StreamReader limit, which the wyoming TCP server keeps: longer lines fail.
HEADER_LINE_LIMIT = 1 << 16


@dataclass(frozen=True)
class EventLimits:
    """Largest event parts accepted from a client."""

    max_data_bytes: int = 1 << 20
    max_payload_bytes: int = 1 << 20


def _length(header: dict, key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{key} must be a non-negative integer, not {value!r}")
    if value > limit:
        raise ProtocolError(f"{key} {value} is over the limit of {limit} bytes")
    return value


def _json_object(raw: bytes, what: str) -> dict:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError(f"{what} is not JSON ({err})") from err
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is a JSON {type(value).__name__}, not an object")
    return value


async def read_event(reader: asyncio.StreamReader, limits: EventLimits = EventLimits()) -> Event | None:
    """The next event, or None when the peer has closed the connection.

    Raises ProtocolError for anything malformed or over the limits.
    """
    try:
        line = await reader.readline()
    except ValueError as err:  # asyncio's line-length limit
        raise ProtocolError(f"header line longer than {HEADER_LINE_LIMIT} bytes") from err
    if not line or not line.endswith(b"\n"):
        return None
    header = _json_object(line, "event header")
    event_type = header.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise ProtocolError("event header has no 'type'")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise ProtocolError("event 'data' is not an object")

    data_length = _length(header, "data_length", limits.max_data_bytes)
    payload_length = _length(header, "payload_length", limits.max_payload_bytes)
    try:
        if data_length:
            data = {**data, **_json_object(await reader.readexactly(data_length), "event data")}
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    return Event(type=event_type, data=data, payload=payload)
