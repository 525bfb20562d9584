"""python -m wyoming_qwen3tts.addon args|healthcheck (used by run.sh and the image)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .healthcheck import describe
from .options import WYOMING_PORT, OptionsError, options_to_args, read_options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wyoming_qwen3tts.addon")
    commands = parser.add_subparsers(dest="command", required=True)
    args_cmd = commands.add_parser("args", help="print the server arguments for an options.json, NUL-separated")
    args_cmd.add_argument("options", type=Path)
    health = commands.add_parser("healthcheck", help="exit 0 when the server answers describe")
    health.add_argument("--port", type=int, default=int(os.environ.get("QWEN3TTS_HEALTH_PORT", WYOMING_PORT)))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "args":
        try:
            server_args = options_to_args(read_options(args.options), args.options)
        except OptionsError as err:
            print(f"Add-on configuration error: {err}", file=sys.stderr)
            return 2
        sys.stdout.write("".join(f"{arg}\0" for arg in server_args))
        return 0
    return 0 if asyncio.run(describe("127.0.0.1", args.port)) else 1


if __name__ == "__main__":
    sys.exit(main())
