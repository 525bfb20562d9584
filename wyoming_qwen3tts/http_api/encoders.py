"""Turning 24 kHz mono PCM chunks into the response formats clients ask for.

wav and pcm stream as they are made (wav with a header whose sizes say "unknown length", which
players accept for streams); flac, mp3 and opus are encoded by soundfile once the audio is
complete.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile

from ..speech import CHANNELS, SAMPLE_RATE, SAMPLE_WIDTH

STREAMED_FORMATS = ("wav", "pcm")
CONTENT_TYPES = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
}
# soundfile format and subtype per encoded response format.
_SOUNDFILE = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}
FORMATS = tuple(CONTENT_TYPES)
_UNKNOWN_SIZE = 0xFFFFFFFF


def streaming_wav_header() -> bytes:
    """A RIFF/WAVE header for 16-bit 24 kHz mono with both sizes set to 'unknown'."""
    byte_rate = SAMPLE_RATE * CHANNELS * SAMPLE_WIDTH
    fmt = struct.pack("<HHIIHH", 1, CHANNELS, SAMPLE_RATE, byte_rate, CHANNELS * SAMPLE_WIDTH, 8 * SAMPLE_WIDTH)
    return (
        b"RIFF" + struct.pack("<I", _UNKNOWN_SIZE) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", _UNKNOWN_SIZE)
    )


def encode(audio: np.ndarray, response_format: str) -> bytes:
    """A whole clip (float32) in flac, mp3 or opus."""
    container, subtype = _SOUNDFILE[response_format]
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format=container, subtype=subtype)
    return buffer.getvalue()
