"""The composition root: build the backend, the voice catalog and the edges, then serve.

The local engine (and with it torch) is imported only when this process runs the model: a
front with `--engine remote` never loads torch.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import replace

from .clone_voices import CloneEntry, build_clone_voices, check_entries, read_voices_file
from .http_api.server import HttpApiServer
from .request import SpeechRequests
from .server.app import WyomingTtsServer
from .settings import Settings
from .speech import SpeechBackend
from .voices import Voice, VoiceCatalog, preset_voices

_LOGGER = logging.getLogger(__name__)


def clone_entries(settings: Settings) -> list[CloneEntry]:
    """Clone voices from the voices file (a YAML file, or the add-on's options.json)."""
    if settings.voices.voices_file is None:
        return []
    return read_voices_file(settings.voices.voices_file, settings.samples_dir)


async def build_catalog(backend: SpeechBackend, settings: Settings, entries: list[CloneEntry]) -> VoiceCatalog:
    presets = preset_voices(backend)
    clones: list[Voice] = []
    if entries and backend.can_clone:
        languages = [name for name in backend.languages if name != "auto"]
        samples = check_entries(entries, [voice.name for voice in presets], backend.languages)
        clones = await build_clone_voices(samples, backend, languages)
        _LOGGER.info("Clone voices: %s", ", ".join(v.name for v in clones) if clones else "none usable")
    elif entries:
        _LOGGER.error("Clone voices are configured, but this backend cannot clone: %s skipped", ", ".join(e.name for e in entries))
    return VoiceCatalog(presets + clones, default=settings.voices.default_voice)


async def open_backend(settings: Settings, wants_clones: bool) -> SpeechBackend:
    if settings.remote is not None:
        from .remote.engine import NoReplicaError, RemoteEngine

        engine = RemoteEngine(settings.remote)
        try:
            await engine.connect(quiet=True)
        except NoReplicaError as err:
            # The GPU box may still be booting, or be off for the night: serve anyway, say so once.
            _LOGGER.warning("%s. Serving without voices and trying again until one answers.", err)
        except BaseException:
            await engine.aclose()
            raise
        return engine
    from .engine.engine import SpeechEngine

    # The Base model is only needed (and only loaded) for clone voices, configured or one-off.
    options = settings.engine if wants_clones else replace(settings.engine, clone_model=None)
    return await asyncio.to_thread(SpeechEngine.load, options)


async def prepare(settings: Settings) -> SpeechRequests:
    """Open the backend (load the models, or reach the remote servers) and build the voice catalog."""
    entries = clone_entries(settings)
    wants_clones = bool(entries) or (settings.http is not None and settings.http.clones)
    backend = await open_backend(settings, wants_clones)
    if backend.ready:
        try:
            catalog = await build_catalog(backend, settings, entries)
        except BaseException:
            await backend.aclose()
            raise
        return SpeechRequests(backend, catalog, settings.requests)
    requests = SpeechRequests(backend, VoiceCatalog([], allow_empty=True), settings.requests)
    requests.tasks.append(asyncio.create_task(_catalog_once_connected(requests, settings, entries)))
    return requests


async def _catalog_once_connected(requests: SpeechRequests, settings: Settings, entries: list[CloneEntry]) -> None:
    await requests.backend.wait_ready()
    try:
        requests.catalog = await build_catalog(requests.backend, settings, entries)
    except Exception:  # noqa: BLE001 - a bad default voice, say: the log says why, the server stays up
        _LOGGER.exception("The remote speech server answered, but its voices cannot be served")
        return
    _LOGGER.info("The remote speech server answered: serving %d voices", len(requests.catalog.voices))


def edges(settings: Settings, requests: SpeechRequests) -> list[WyomingTtsServer | HttpApiServer]:
    servers: list[WyomingTtsServer | HttpApiServer] = [WyomingTtsServer(settings.wyoming, requests)]
    if settings.http is not None:
        servers.append(HttpApiServer(settings.http, requests, settings.samples_dir))
    return servers


async def serve(settings: Settings) -> None:
    """Open the backend, then serve until SIGTERM or SIGINT."""
    requests = await prepare(settings)
    servers = edges(settings, requests)
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
        await requests.aclose()
