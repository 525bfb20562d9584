"""The voice catalog: what `describe` advertises and what a request's voice name resolves to.

Preset voices are read from the CustomVoice checkpoint's own speaker table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .speech import CLONE_KINDS, PresetSpeaker, SpeechBackend, VoiceSpec

# Language names as the package spells them -> BCP 47 codes, as Home Assistant matches them.
LANGUAGE_CODES = {
    "chinese": "zh",
    "english": "en",
    "german": "de",
    "italian": "it",
    "portuguese": "pt",
    "spanish": "es",
    "japanese": "ja",
    "korean": "ko",
    "french": "fr",
    "russian": "ru",
    "beijing_dialect": "zh",
    "sichuan_dialect": "zh",
}

# The model card's native language of each published speaker. Only used to describe and order;
# which speakers exist always comes from the checkpoint.
NATIVE_LANGUAGE = {
    "vivian": "chinese",
    "serena": "chinese",
    "uncle_fu": "chinese",
    "dylan": "beijing_dialect",
    "eric": "sichuan_dialect",
    "ryan": "english",
    "aiden": "english",
    "ono_anna": "japanese",
    "sohee": "korean",
}


def language_label(name: str) -> str:
    """'beijing_dialect' -> 'Beijing dialect', 'english' -> 'English'."""
    label = name.replace("_", " ")
    return label[:1].upper() + label[1:]


def display_name(speaker: str) -> str:
    """'uncle_fu' -> 'Uncle_Fu', as the model card spells the speakers."""
    return "_".join(part[:1].upper() + part[1:] for part in speaker.split("_"))


@dataclass(frozen=True)
class VoiceOptions:
    """Which voices the catalog holds besides the presets, and which one is the default."""

    default_voice: str | None = None  # None: the first preset speaker
    voices_file: Path | None = None  # YAML (or the add-on's options.json) with clone voices
    voices_dir: Path | None = None  # where relative sample paths point; default: the file's folder

    @property
    def samples_dir(self) -> Path | None:
        return self.voices_dir if self.voices_dir is not None else (None if self.voices_file is None else self.voices_file.parent)


@dataclass(frozen=True)
class Voice:
    """One voice a client can ask for by name."""

    name: str
    description: str
    languages: list[str]  # BCP 47 codes, the voice's own language first
    spec: VoiceSpec = field(compare=False)
    language: str = "auto"  # the language passed to the model

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def is_clone(self) -> bool:
        return isinstance(self.spec, CLONE_KINDS)


def ordered_codes(native: str | None, languages: list[str]) -> list[str]:
    codes: list[str] = []
    for name in ([native] if native else []) + languages:
        code = LANGUAGE_CODES.get(name)
        if code and code not in codes:
            codes.append(code)
    return codes


def preset_voices(engine: SpeechBackend) -> list[Voice]:
    """Voices for the CustomVoice checkpoint's speakers, in the checkpoint's order."""
    languages = [name for name in engine.languages if name != "auto"]
    voices = []
    for speaker in engine.speakers:
        native = engine.speaker_dialect(speaker) or NATIVE_LANGUAGE.get(speaker.lower())
        label = language_label(native) if native else "multilingual"
        voices.append(
            Voice(
                name=display_name(speaker),
                description=f"{display_name(speaker).replace('_', ' ')} — {label}",
                languages=ordered_codes(native, languages),
                spec=PresetSpeaker(speaker),
            )
        )
    return voices


class VoiceCatalog:
    """Voices by case-insensitive name, with a default."""

    def __init__(self, voices: list[Voice], default: str | None = None, allow_empty: bool = False) -> None:
        if not voices and not allow_empty:
            raise ValueError("no voices: the model has no speakers and no clone voice is configured")
        self._voices = {voice.key: voice for voice in voices}
        self.default: Voice | None
        if default is None or not voices:
            self.default = voices[0] if voices else None
        elif default.lower() in self._voices:
            self.default = self._voices[default.lower()]
        else:
            raise ValueError(f"Default voice {default!r} is not one of: {', '.join(self.names)}")

    @property
    def voices(self) -> list[Voice]:
        return list(self._voices.values())

    @property
    def names(self) -> list[str]:
        return [voice.name for voice in self._voices.values()]

    def find(self, name: str | None) -> Voice | None:
        """The named voice (any case); the default for no name; None if unknown."""
        if name is None or not name.strip():
            return self.default
        return self._voices.get(name.strip().lower())
