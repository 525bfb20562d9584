"""Wiring: engine + voices + Wyoming TCP server + zeroconf."""

from __future__ import annotations

import asyncio
import logging
import signal
from functools import partial
from urllib.parse import urlparse

from wyoming.server import AsyncServer, AsyncTcpServer

from ..engine.engine import SpeechEngine
from ..settings import Settings
from ..voices import VoiceCatalog, preset_voices
from .discovery import announce
from .handler import HandlerConfig, TtsEventHandler
from .info import build_info

_LOGGER = logging.getLogger(__name__)


def build_catalog(engine: SpeechEngine, settings: Settings) -> VoiceCatalog:
    return VoiceCatalog(preset_voices(engine), default=settings.default_voice)


def handler_config(engine: SpeechEngine, settings: Settings) -> HandlerConfig:
    catalog = build_catalog(engine, settings)
    return HandlerConfig(
        engine=engine,
        catalog=catalog,
        info=build_info(catalog, streaming=settings.streaming),
        max_text_chars=settings.max_text_chars,
        limits=settings.limits,
        request=settings.request,
    )


class WyomingTtsServer:
    """The Wyoming side of the product: listens, announces, serves every connection."""

    def __init__(self, settings: Settings, engine: SpeechEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.config = handler_config(engine, settings)
        self._server = AsyncServer.from_uri(settings.uri)
        self._zeroconf = None

    async def start(self) -> None:
        """Listen and announce, without blocking."""
        await self._server.start(partial(TtsEventHandler, self.config))
        _LOGGER.info(
            "Listening on %s with %d voices (default %s)",
            self.settings.uri,
            len(self.config.catalog.voices),
            self.config.catalog.default.name,
        )
        if self.settings.zeroconf_name:
            if not isinstance(self._server, AsyncTcpServer):
                _LOGGER.warning("Zeroconf needs a tcp:// URI; not announcing %s", self.settings.uri)
            else:
                parsed = urlparse(self.settings.uri)
                self._zeroconf = await announce(
                    self.settings.zeroconf_name, self._server.port, parsed.hostname or "", self.settings.zeroconf_host
                )

    async def stop(self) -> None:
        await self._server.stop()


async def serve(settings: Settings) -> None:
    """Load the models, then serve until SIGTERM or SIGINT."""
    engine = await asyncio.to_thread(SpeechEngine.load, settings.engine_options(with_clone_model=False))
    server = WyomingTtsServer(settings, engine)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stopped.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await server.start()
        await stopped.wait()
        _LOGGER.info("Stopping")
    finally:
        await server.stop()
        engine.close()
