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
SUPERVISOR_URL = "http://supervisor"


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


# Add-on options that become one flag each: (option, flag, kind). "value" passes the option's
# text when it is set; "switch" passes the flag when the option is true, "not-switch" when it
# is false; "flags" repeats the flag once per list item.
OPTION_FLAGS = (
    ("device", "--device", "value"),
    ("dtype", "--dtype", "value"),
    ("quantize", "--quantize", "value"),
    ("codec_precision", "--codec-precision", "value"),
    ("log_level", "--log-level", "value"),
    ("default_voice", "--voice", "value"),
    ("compile", "--compile", "switch"),
    ("max_batch", "--max-batch", "value"),
    ("streaming", "--no-streaming", "not-switch"),
    ("stream_text_by", "--stream-text-by", "value"),
    ("zeroconf_name", "--zeroconf", "value"),
)
REMOTE_FLAGS = (
    ("remote_urls", "--remote-url", "flags"),
    ("remote_api_key", "--remote-api-key", "value"),
    ("remote_model", "--remote-model", "value"),
)
HTTP_FLAGS = (
    ("http_api_key", "--http-api-key", "value"),
    ("http_clones", "--http-clones", "switch"),
)


def _flags(options: dict[str, Any], table) -> list[str]:
    args: list[str] = []
    for key, flag, kind in table:
        value = options.get(key)
        if kind == "switch" and value is True:
            args.append(flag)
        elif kind == "not-switch" and value is False:
            args.append(flag)
        elif kind == "flags":
            for item in value or []:
                if str(item).strip():
                    args += [flag, str(item).strip()]
        elif kind == "value" and value is not None and str(value).strip():
            args += [flag, str(value).strip()]
    return args


def options_to_args(options: dict[str, Any], options_path: Path) -> list[str]:
    """Server arguments for these add-on options."""
    args = [
        "--uri", f"tcp://0.0.0.0:{WYOMING_PORT}",
        "--supervisor-discovery", SUPERVISOR_URL,
        "--data-dir", DATA_DIR,
        "--model", _model(options, "model", "custom_model"),
        "--clone-model", _model(options, "clone_model", "custom_clone_model"),
        "--voices", str(options_path),
        "--voices-dir", VOICES_DIR,
    ]
    args += _flags(options, OPTION_FLAGS)
    if options.get("engine", "local") == "remote":
        remote = _flags(options, REMOTE_FLAGS)
        if "--remote-url" not in remote:
            raise OptionsError("'engine' is 'remote' but 'remote_urls' is empty: add the speech servers' URLs")
        args += ["--engine", "remote", *remote]
    if options.get("http_api", False):
        # Inside the add-on's container; the Supervisor's port mapping decides who reaches it.
        args += ["--http-port", str(HTTP_PORT), "--http-host", "0.0.0.0", *_flags(options, HTTP_FLAGS)]
    return args


def read_options(path: Path) -> dict[str, Any]:
    try:
        options = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise OptionsError(f"cannot read the add-on options {path}: {err}") from err
    if not isinstance(options, dict):
        raise OptionsError(f"{path} does not hold an object")
    return options
