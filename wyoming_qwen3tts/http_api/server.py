"""Running the HTTP API next to the Wyoming server, on the same event loop and engine."""

from __future__ import annotations

import logging

from aiohttp import web

from ..clone_cache import ClonePromptCache, ClonePrompts
from ..engine.engine import SpeechEngine
from ..settings import Settings
from ..voices import VoiceCatalog
from .app import HttpApiOptions, SpeechApi, create_app

_LOGGER = logging.getLogger(__name__)


class HttpApiServer:
    def __init__(self, settings: Settings, engine: SpeechEngine, catalog: VoiceCatalog) -> None:
        self.options = HttpApiOptions(
            host=settings.http_host,
            port=settings.http_port or 0,
            api_key=settings.http_api_key,
            max_text_chars=settings.max_text_chars,
            max_body_bytes=settings.http_max_body_bytes,
            max_reference_bytes=min(16 << 20, settings.http_max_body_bytes),
            voices_dir=settings.samples_dir,
        )
        # One-off clones need the local Base model; a remote engine serves presets here.
        local_clones = isinstance(engine, SpeechEngine) and engine.can_clone
        prompts = ClonePrompts(engine, ClonePromptCache(settings.clone_cache_dir)) if local_clones else None
        self.app = create_app(SpeechApi(engine, catalog, self.options, prompts, settings.request))
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.options.host, self.options.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        _LOGGER.info(
            "OpenAI-compatible speech API on http://%s:%d/v1/audio/speech%s",
            self.options.host,
            self.port,
            " (API key required)" if self.options.api_key else "",
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
