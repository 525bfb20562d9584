"""Telling Home Assistant about the server through the Supervisor's discovery API.

The server does this itself, once it listens (the first start may spend a long time downloading
the model): post {"service": "wyoming", "config": {"uri": "tcp://<add-on host>:10200"}}, as
bashio's discovery helper does, and try again with growing pauses until the Supervisor accepts
it (it may itself be restarting). In the server's process, so it logs like the server and leaves
no process behind.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp

_LOGGER = logging.getLogger(__name__)


async def post_discovery(supervisor_url: str, token: str, uri: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(
            f"{supervisor_url.rstrip('/')}/discovery",
            json={"service": "wyoming", "config": {"uri": uri}},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            if response.status >= 400:
                raise RuntimeError(f"the Supervisor answered {response.status}: {(await response.text())[:200]}")


async def announce(
    supervisor_url: str,
    token: str,
    port: int,
    host: str | None = None,
    first_pause: float = 5.0,
    longest_pause: float = 300.0,
) -> None:
    """Register the server with the Supervisor, retrying until it is accepted (or cancelled)."""
    uri = f"tcp://{host or socket.gethostname()}:{port}"
    pause, attempts = first_pause, 0
    while True:
        attempts += 1
        try:
            await post_discovery(supervisor_url, token, uri)
        except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as err:
            # Say it once, then now and then: Home Assistant finds the server only after this.
            log = _LOGGER.warning if attempts == 1 or attempts % 10 == 0 else _LOGGER.debug
            log("Could not tell Home Assistant where this server is (%s); trying again in %.0f s", err, pause)
            await asyncio.sleep(pause)
            pause = min(longest_pause, pause * 2)
            continue
        _LOGGER.info("Told Home Assistant where this server is: %s", uri)
        return
