"""The add-on's /data/options.json as the server's command line.

run.sh stays a few lines: it asks this module for the arguments and execs the server. Clone
voices are not turned into flags: the server reads them straight from options.json (its
`voices` list has the same schema as a voices YAML file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WYOMING_PORT = 10200
HTTP_PORT = 10201
DATA_DIR = "/data"
VOICES_DIR = "/share/qwen3tts"
CUSTOM = "custom"


class OptionsError(ValueError):
    """The options cannot describe a working server; the message says which and why."""


def _model(options: dict[str, Any], choice_key: str, custom_key: str) -> str:
    choice = str(options.get(choice_key) or "").strip()
    if choice != CUSTOM:
        if not choice:
            raise OptionsError(f"'{choice_key}' is empty; pick one of the listed models")
        return choice
    custom = str(options.get(custom_key) or "").strip()
    if not custom:
        raise OptionsError(
            f"'{choice_key}' is 'custom' but '{custom_key}' is empty: give a Hugging Face id "
            f"or a model folder (for example under /share)"
        )
    return custom


def options_to_args(options: dict[str, Any], options_path: Path) -> list[str]:
    """Server arguments for these add-on options."""
    args = [
        "--uri", f"tcp://0.0.0.0:{WYOMING_PORT}",
        "--data-dir", DATA_DIR,
        "--model", _model(options, "model", "custom_model"),
        "--clone-model", _model(options, "clone_model", "custom_clone_model"),
        "--device", str(options.get("device", "auto")),
        "--dtype", str(options.get("dtype", "auto")),
        "--voices", str(options_path),
        "--voices-dir", VOICES_DIR,
        "--log-level", str(options.get("log_level", "info")),
    ]
    if options.get("engine", "local") == "remote":
        urls = [str(url).strip() for url in options.get("remote_urls") or [] if str(url).strip()]
        if not urls:
            raise OptionsError("'engine' is 'remote' but 'remote_urls' is empty: add the speech servers' URLs")
        args += ["--engine", "remote"]
        for url in urls:
            args += ["--remote-url", url]
        for key, flag in (("remote_api_key", "--remote-api-key"), ("remote_model", "--remote-model")):
            value = str(options.get(key) or "").strip()
            if value:
                args += [flag, value]
    default_voice = str(options.get("default_voice") or "").strip()
    if default_voice:
        args += ["--voice", default_voice]
    if options.get("compile", False):
        args.append("--compile")
    if not options.get("streaming", True):
        args.append("--no-streaming")
    args += ["--stream-text-by", str(options.get("stream_text_by", "words"))]
    zeroconf_name = str(options.get("zeroconf_name") or "").strip()
    if zeroconf_name:
        args += ["--zeroconf", zeroconf_name]
    if options.get("http_api", False):
        # Inside the add-on's container; the Supervisor's port mapping decides who reaches it.
        args += ["--http-port", str(HTTP_PORT), "--http-host", "0.0.0.0"]
        api_key = str(options.get("http_api_key") or "").strip()
        if api_key:
            args += ["--http-api-key", api_key]
        if options.get("http_clones", False):
            args.append("--http-clones")
    return args


def read_options(path: Path) -> dict[str, Any]:
    try:
        options = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise OptionsError(f"cannot read the add-on options {path}: {err}") from err
    if not isinstance(options, dict):
        raise OptionsError(f"{path} does not hold an object")
    return options
