"""Wiring: engine + voices + Wyoming TCP server + zeroconf."""

from __future__ import annotations

import asyncio
import logging
import signal
from functools import partial
from urllib.parse import urlparse

from wyoming.server import AsyncServer, AsyncTcpServer

from ..engine.engine import SpeechEngine
from ..http_api.server import HttpApiServer
from ..settings import Settings
from ..clone_cache import ClonePromptCache, ClonePrompts
from ..clone_voices import CloneEntry, build_clone_voices, check_entries, read_voices_file
from ..remote.engine import RemoteClone, RemoteEngine
from ..voices import Voice, VoiceCatalog, preset_voices
from .discovery import announce
from .handler import HandlerConfig, TtsEventHandler
from .info import build_info

_LOGGER = logging.getLogger(__name__)


def clone_entries(settings: Settings) -> list[CloneEntry]:
    """Clone voices from the voices file (a YAML file, or the add-on's options.json)."""
    if settings.voices_file is None:
        return []
    return read_voices_file(settings.voices_file, settings.samples_dir)


def _clone_specs(engine, settings: Settings):
    """How a checked clone sample becomes a voice spec for this engine."""
    if isinstance(engine, RemoteEngine):

        async def remote(sample):
            return RemoteClone.from_sample(sample.audio_bytes, sample.entry.audio, sample.entry.transcript), False

        return remote
    prompts = ClonePrompts(engine, ClonePromptCache(settings.clone_cache_dir))

    async def local(sample):
        return await prompts.get(sample.audio_bytes, sample.audio, sample.entry.transcript)

    return local


async def build_catalog(engine, settings: Settings, entries: list[CloneEntry]) -> VoiceCatalog:
    presets = preset_voices(engine)
    clones: list[Voice] = []
    if entries and engine.can_clone:
        languages = [name for name in engine.languages if name != "auto"]
        samples = check_entries(entries, [voice.name for voice in presets], engine.languages)
        clones = await build_clone_voices(samples, _clone_specs(engine, settings), languages)
        _LOGGER.info("Clone voices: %s", ", ".join(v.name for v in clones) if clones else "none usable")
    return VoiceCatalog(presets + clones, default=settings.default_voice)


def handler_config(engine: SpeechEngine, catalog: VoiceCatalog, settings: Settings) -> HandlerConfig:
    return HandlerConfig(
        engine=engine,
        catalog=catalog,
        info=build_info(catalog, streaming=settings.streaming),
        max_text_chars=settings.max_text_chars,
        limits=settings.limits,
        request=settings.request,
        stream_text_by=settings.stream_text_by,
    )


class WyomingTtsServer:
    """The Wyoming side of the product: listens, announces, serves every connection."""

    def __init__(self, settings: Settings, engine: SpeechEngine, catalog: VoiceCatalog) -> None:
        self.settings = settings
        self.engine = engine
        self.config = handler_config(engine, catalog, settings)
        self._server = AsyncServer.from_uri(settings.uri)
        self._zeroconf = None  # held so the announcement lives as long as the server

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


async def prepare(settings: Settings):
    """Load the models (or reach the remote servers) and build the voice catalog."""
    entries = clone_entries(settings)
    if settings.remote is not None:
        engine = RemoteEngine(settings.remote)
        await engine.connect()
        return engine, await build_catalog(engine, settings, entries)
    # The Base model is only needed (and only loaded) for clone voices, configured or one-off.
    wants_clones = bool(entries) or (settings.http_port is not None and settings.http_clones)
    engine = await asyncio.to_thread(SpeechEngine.load, settings.engine_options(with_clone_model=wants_clones))
    try:
        catalog = await build_catalog(engine, settings, entries)
    except BaseException:
        engine.close()
        raise
    return engine, catalog


async def serve(settings: Settings) -> None:
    """Load the models, then serve until SIGTERM or SIGINT."""
    engine, catalog = await prepare(settings)
    servers = [WyomingTtsServer(settings, engine, catalog)]
    if settings.http_port is not None:
        servers.append(HttpApiServer(settings, engine, catalog))
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stopped.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        for server in servers:
            await server.start()
        await stopped.wait()
        _LOGGER.info("Stopping")
    finally:
        for server in servers:
            await server.stop()
        await engine.aclose()
