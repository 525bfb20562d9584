"""Reference audio for one-off clones, from a request: base64, a data URI, or a voices-folder file.

A path never reaches outside the voices folder: it is resolved (symlinks followed) and must
still lie inside. URLs are not fetched.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from .errors import ApiError

# Longer strings are base64: a file name is never this long, and base64 this short is < 1 s.
MAX_PATH_CHARS = 4096


def _decode_base64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, f"{param} is not valid base64 ({err})", param=param) from err


def _read_voices_file(value: str, voices_dir: Path | None, max_bytes: int, param: str) -> bytes:
    if voices_dir is None:
        raise ApiError(400, f"{param}: file references are off (no voices folder is configured)", param=param)
    root = voices_dir.resolve()
    candidate = Path(value.removeprefix("file://"))
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise ApiError(403, f"{param} points outside the voices folder", param=param, code="path_outside_voices_folder")
    if not resolved.is_file():
        raise ApiError(400, f"{param}: no file {value!r} in the voices folder", param=param)
    if resolved.stat().st_size > max_bytes:
        raise ApiError(413, f"{param} is larger than {max_bytes} bytes", param=param)
    return resolved.read_bytes()


def reference_bytes(value: str, voices_dir: Path | None, max_bytes: int, param: str = "reference_audio") -> bytes:
    """The raw bytes of an audio file given as base64, a data URI or a voices-folder path."""
    value = value.strip()
    if not value:
        raise ApiError(400, f"{param} is empty", param=param)
    if value.startswith("data:"):
        header, _, data = value.partition(",")
        if ";base64" not in header:
            raise ApiError(400, f"{param}: only base64 data URIs are accepted", param=param)
        audio = _decode_base64(data, param)
    elif value.startswith(("http://", "https://")):
        raise ApiError(400, f"{param}: URLs are not fetched; send the audio as base64 or upload it", param=param)
    elif value.startswith("file://") or len(value) <= MAX_PATH_CHARS:
        audio = _read_voices_file(value, voices_dir, max_bytes, param)
    else:
        audio = _decode_base64(value, param)
    if len(audio) > max_bytes:
        raise ApiError(413, f"{param} is larger than {max_bytes} bytes", param=param)
    return audio
