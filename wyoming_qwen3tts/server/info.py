"""The `info` answer to `describe`: one TTS program and its voices."""

from __future__ import annotations

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

from .. import __version__
from ..voices import VoiceCatalog

PROGRAM_NAME = "qwen3-tts"
ATTRIBUTION = Attribution(name="Qwen", url="https://github.com/QwenLM/Qwen3-TTS")


def build_info(catalog: VoiceCatalog, streaming: bool) -> Info:
    voices = [
        TtsVoice(
            name=voice.name,
            description=voice.description,
            attribution=ATTRIBUTION,
            installed=True,
            version=None,
            languages=voice.languages,
        )
        for voice in catalog.voices
    ]
    program = TtsProgram(
        name=PROGRAM_NAME,
        description="Qwen3-TTS 12 Hz, streaming as it speaks",
        attribution=ATTRIBUTION,
        installed=True,
        version=__version__,
        voices=voices,
        supports_synthesize_streaming=streaming,
    )
    return Info(tts=[program])
