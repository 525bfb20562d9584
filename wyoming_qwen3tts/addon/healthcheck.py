"""Is the server answering? A `describe` round trip (the Docker HEALTHCHECK uses it)."""

from __future__ import annotations

import asyncio

from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info


async def describe(host: str, port: int, timeout: float = 10.0) -> bool:
    try:
        async with asyncio.timeout(timeout):
            async with AsyncTcpClient(host, port) as client:
                await client.write_event(Describe().event())
                event = await client.read_event()
    except (OSError, asyncio.TimeoutError):
        return False
    return event is not None and Info.is_type(event.type) and bool(Info.from_event(event).tts)
