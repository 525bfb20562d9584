"""python -m wyoming_qwen3tts: command line, logging, and the server."""

from __future__ import annotations

import asyncio
import logging
import sys

from .engine.loader import ModelUnavailableError
from .server.app import serve
from .settings import Settings, configure_logging

_LOGGER = logging.getLogger("wyoming_qwen3tts")


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_args(argv)
    configure_logging(settings.log_level)
    _LOGGER.debug("Settings: %s", settings)
    try:
        asyncio.run(serve(settings))
    except ModelUnavailableError as err:
        _LOGGER.error("%s", err)
        return 2
    except ValueError as err:
        _LOGGER.error("Cannot start: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
