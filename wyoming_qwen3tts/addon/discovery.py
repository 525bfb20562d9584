"""Telling Home Assistant about the server through the Supervisor's discovery API.

Once the server answers `describe` (the first start may spend a long time downloading the
model), post {"service": "wyoming", "config": {"uri": "tcp://<add-on host>:10200"}}, as
bashio's discovery helper does.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import aiohttp

from .healthcheck import describe

_LOGGER = logging.getLogger(__name__)


async def wait_until_serving(port: int, timeout: float, interval: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await describe("127.0.0.1", port, timeout=5.0):
            return True
        await asyncio.sleep(interval)
    return False


async def post_discovery(supervisor_url: str, token: str, uri: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(
            f"{supervisor_url.rstrip('/')}/discovery",
            json={"service": "wyoming", "config": {"uri": uri}},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            if response.status >= 400:
                raise RuntimeError(f"Supervisor answered {response.status}: {(await response.text())[:200]}")


async def announce(port: int, supervisor_url: str, token: str, host: str | None = None, wait: float = 6 * 3600) -> bool:
    """Wait for the server, then register it with the Supervisor. True on success."""
    if not await wait_until_serving(port, wait):
        _LOGGER.error("The server never answered on port %d; Home Assistant was not told about it", port)
        return False
    uri = f"tcp://{host or socket.gethostname()}:{port}"
    try:
        await post_discovery(supervisor_url, token, uri)
    except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as err:
        _LOGGER.error("Discovery message to Home Assistant failed: %s", err)
        return False
    _LOGGER.info("Sent discovery to Home Assistant: %s", uri)
    return True
