"""python -m wyoming_qwen3tts: command line, logging, and the server."""

from __future__ import annotations

import asyncio
import logging
import sys

from .serve import serve
from .settings import Settings, configure_logging
from .speech import BackendUnavailableError

_LOGGER = logging.getLogger("wyoming_qwen3tts")


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_args(argv)
    configure_logging(settings.log_level)
    _LOGGER.debug("Settings: %s", settings)
    try:
        asyncio.run(serve(settings))
    except ValueError as err:
        _LOGGER.error("Cannot start: %s", err)
        return 2
    except BackendUnavailableError as err:  # the model is missing, or no remote server answered
        _LOGGER.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
