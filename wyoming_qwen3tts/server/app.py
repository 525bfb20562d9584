"""The Wyoming side of the product: listens, announces (zeroconf, Home Assistant's Supervisor),
serves every connection."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlparse

from wyoming.server import AsyncServer, AsyncTcpServer

from ..addon.discovery import announce as announce_to_supervisor
from ..request import SpeechRequests
from .discovery import announce
from .events import EventLimits
from .handler import HandlerConfig, TtsEventHandler

_LOGGER = logging.getLogger(__name__)

DEFAULT_ZEROCONF_NAME = "qwen3-tts"


@dataclass(frozen=True)
class WyomingOptions:
    """Where the Wyoming server listens and what it announces."""

    uri: str = "tcp://0.0.0.0:10200"
    zeroconf_name: str | None = None  # None: no zeroconf announcement
    zeroconf_host: str | None = None  # address to announce; None: this host's LAN address
    streaming: bool = True  # advertise streaming synthesis (synthesize-start/chunk/stop)
    limits: EventLimits = field(default_factory=EventLimits)
    # The Supervisor's URL, when running as a Home Assistant add-on: tell it where to find us.
    supervisor_url: str | None = None

    def __post_init__(self) -> None:
        if not self.uri.startswith(("tcp://", "unix://")):
            raise ValueError(f"the Wyoming URI must start with tcp:// or unix://, not {self.uri!r}")


class WyomingTtsServer:
    def __init__(self, options: WyomingOptions, requests: SpeechRequests) -> None:
        self.options = options
        self.config = HandlerConfig(requests=requests, streaming=options.streaming, limits=options.limits)
        self._server = AsyncServer.from_uri(options.uri)
        self._zeroconf = None  # held so the announcement lives as long as the server
        self._supervisor: asyncio.Task | None = None

    @property
    def port(self) -> int | None:
        return self._server.port if isinstance(self._server, AsyncTcpServer) else None

    async def start(self) -> None:
        """Listen and announce, without blocking."""
        await self._server.start(partial(TtsEventHandler, self.config))
        catalog = self.config.requests.catalog
        default = catalog.default.name if catalog.default else "none yet"
        _LOGGER.info("Listening on %s with %d voices (default %s)", self.options.uri, len(catalog.voices), default)
        if self.options.zeroconf_name:
            if not isinstance(self._server, AsyncTcpServer):
                _LOGGER.warning("Zeroconf needs a tcp:// URI; not announcing %s", self.options.uri)
            else:
                host = urlparse(self.options.uri).hostname or ""
                self._zeroconf = await announce(self.options.zeroconf_name, self._server.port, host, self.options.zeroconf_host)
        if self.options.supervisor_url:
            token = os.environ.get("SUPERVISOR_TOKEN")
            if not token or self.port is None:
                _LOGGER.warning("Not running as a Home Assistant add-on (no SUPERVISOR_TOKEN) or not on TCP: no discovery")
            else:
                self._supervisor = asyncio.create_task(announce_to_supervisor(self.options.supervisor_url, token, self.port))

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        await self._server.stop()
