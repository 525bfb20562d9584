"""Voice clones managed as configuration: entries, their samples, and their prompts.

The same entry schema comes from a YAML file (`--voices FILE`) or from the add-on's options:

    voices:
      - name: Grandma            # what clients ask for
        audio: grandma.wav       # relative to the voices folder, or absolute
        transcript: "Hello..."   # optional; without it only the voice timbre is cloned
        language: english        # optional; default auto

A broken entry is logged with its name and the reason, and skipped; the others still serve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from .reference_audio import ReferenceAudioError, clone_source
from .speech import CloneSource, SpeechBackend
from .voices import LANGUAGE_CODES, Voice, language_label, ordered_codes

_LOGGER = logging.getLogger(__name__)

ENTRY_FIELDS = ("name", "audio", "transcript", "language")


@dataclass(frozen=True)
class CloneEntry:
    """One configured clone voice."""

    name: str
    audio: Path
    transcript: str | None = None
    language: str = "auto"


@dataclass(frozen=True)
class CloneSample:
    """An entry whose sample was read and passed the checks."""

    entry: CloneEntry
    source: CloneSource


def _language_name(value: str, languages: list[str]) -> str | None:
    """'en' or 'English' -> 'english'; None when the model does not know it."""
    name = value.strip().lower()
    if name in languages:
        return name
    by_code = {code: lang for lang, code in LANGUAGE_CODES.items() if "dialect" not in lang}
    return by_code.get(name) if by_code.get(name) in languages else None


def parse_entries(raw: object, voices_dir: Path, source: str) -> list[CloneEntry]:
    """Entries from a list of mappings; malformed ones are logged and skipped."""
    if raw is None:
        return []
    if isinstance(raw, dict) and "voices" in raw:
        raw = raw["voices"]
    if not isinstance(raw, list):
        _LOGGER.error("%s: 'voices' must be a list of {name, audio, transcript, language}; ignoring it", source)
        return []
    entries: list[CloneEntry] = []
    for index, item in enumerate(raw, start=1):
        where = f"{source}, voice #{index}"
        if not isinstance(item, dict):
            _LOGGER.error("%s: expected a mapping with name and audio, got %r; skipped", where, item)
            continue
        name = str(item.get("name") or "").strip()
        audio = str(item.get("audio") or "").strip()
        if not name or not audio:
            _LOGGER.error("%s: every voice needs a 'name' and an 'audio' file; skipped", where)
            continue
        unknown = sorted(set(item) - set(ENTRY_FIELDS))
        if unknown:
            _LOGGER.warning("Voice %r (%s): ignoring unknown fields %s", name, where, ", ".join(unknown))
        transcript = str(item.get("transcript") or "").strip() or None
        path = Path(audio).expanduser()
        entries.append(
            CloneEntry(
                name=name,
                audio=path if path.is_absolute() else voices_dir / path,
                transcript=transcript,
                language=str(item.get("language") or "auto").strip() or "auto",
            )
        )
    return entries


def read_voices_file(path: Path, voices_dir: Path | None = None) -> list[CloneEntry]:
    """Entries from a YAML file; sample paths are relative to ``voices_dir`` (default: its folder)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        _LOGGER.error("Cannot read the voices file %s (%s); no clone voices", path, err)
        return []
    return parse_entries(raw, voices_dir or Path(path).parent, str(path))


def check_entries(entries: list[CloneEntry], reserved: list[str], languages: list[str]) -> list[CloneSample]:
    """Read each entry's sample; skip (and log) duplicates, clashes and bad samples."""
    presets = {name.lower() for name in reserved}
    taken: set[str] = set()
    samples: list[CloneSample] = []
    for entry in entries:
        key = entry.name.lower()
        if key in presets or key in taken:
            clash = "a preset speaker" if key in presets else "another clone voice"
            _LOGGER.error("Voice %r skipped: the name is already used by %s; pick another name", entry.name, clash)
            continue
        language = _language_name(entry.language, languages)
        if language is None:
            _LOGGER.error(
                "Voice %r skipped: unknown language %r; use one of %s", entry.name, entry.language, ", ".join(languages)
            )
            continue
        if not entry.audio.is_file():
            _LOGGER.error("Voice %r skipped: the sample %s does not exist", entry.name, entry.audio)
            continue
        try:
            label = f"Voice {entry.name!r} ({entry.audio.name})"
            source = clone_source(entry.audio.read_bytes(), label, entry.transcript, entry.audio.name)
        except (OSError, ReferenceAudioError) as err:
            _LOGGER.error("Voice %r skipped: %s", entry.name, err)
            continue
        if entry.transcript is None:
            _LOGGER.info(
                "Voice %r has no transcript: cloning the timbre alone (x-vector mode); add the sample's "
                "transcript for a closer clone",
                entry.name,
            )
        taken.add(key)
        samples.append(CloneSample(entry=CloneEntry(entry.name, entry.audio, entry.transcript, language), source=source))
    return samples


async def build_clone_voices(samples: list[CloneSample], backend: SpeechBackend, languages: list[str]) -> list[Voice]:
    """Voices for the checked samples, cloned by ``backend``."""
    voices = []
    for sample in samples:
        entry = sample.entry
        try:
            spec, computed = await backend.clone(sample.source)
        except Exception as err:  # noqa: BLE001 - one voice must not stop the others
            _LOGGER.error("Voice %r skipped: computing its clone prompt failed (%s)", entry.name, err)
            continue
        if computed:
            _LOGGER.info("Voice %r: clone prompt computed and cached", entry.name)
        label = "voice clone" if entry.language == "auto" else f"voice clone, {language_label(entry.language)}"
        voices.append(
            Voice(
                name=entry.name,
                description=f"{entry.name} — {label}",
                languages=ordered_codes(None if entry.language == "auto" else entry.language, languages),
                spec=spec,
                language=entry.language,
            )
        )
    return voices
