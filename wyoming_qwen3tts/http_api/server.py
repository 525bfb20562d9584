"""Running the HTTP API next to the Wyoming server, on the same event loop and backend."""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from ..request import SpeechRequests
from .app import HttpApiOptions, SpeechApi, create_app

_LOGGER = logging.getLogger(__name__)


class HttpApiServer:
    def __init__(self, options: HttpApiOptions, requests: SpeechRequests, voices_dir: Path | None) -> None:
        self.options = options
        self.app = create_app(SpeechApi(requests, options, voices_dir))
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
