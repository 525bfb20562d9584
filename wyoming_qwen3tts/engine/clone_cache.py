"""Clone prompts cached on disk, so a configured voice is computed once, not at every start.

An entry's key hashes everything the prompt depends on: the sample's bytes, the transcript, the
mode (in-context or x-vector only) and the identity of the Base checkpoint. A changed sample
gets a new entry; an entry that does not load is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
import torch

from ..speech import ClonePrompt

_LOGGER = logging.getLogger(__name__)

FORMAT_VERSION = 1
_WEIGHT_FILES = ("model.safetensors", "speech_tokenizer/model.safetensors")
_CONFIG_FILES = ("config.json", "speech_tokenizer/config.json")
_PROBE_BYTES = 1 << 16


def checkpoint_identity(folder: Path) -> str:
    """A fingerprint of a checkpoint's configs and weights (sampled, so it is quick)."""
    digest = hashlib.sha256()
    for name in _CONFIG_FILES:
        path = folder / name
        digest.update(path.read_bytes() if path.is_file() else b"-")
    for name in _WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            digest.update(b"-")
            continue
        size = path.stat().st_size
        digest.update(str(size).encode())
        with path.open("rb") as handle:
            for fraction in (0.0, 0.25, 0.5, 0.75):
                handle.seek(int(size * fraction))
                digest.update(handle.read(_PROBE_BYTES))
            handle.seek(max(0, size - _PROBE_BYTES))
            digest.update(handle.read(_PROBE_BYTES))
    return digest.hexdigest()


def prompt_key(audio_bytes: bytes, transcript: str | None, checkpoint: str) -> str:
    mode = "icl" if transcript else "xvector"
    digest = hashlib.sha256()
    for part in (str(FORMAT_VERSION), mode, transcript or "", checkpoint):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    digest.update(audio_bytes)
    return digest.hexdigest()


class ClonePromptCache:
    """A folder of cached prompts, one file per key, the least recently used dropped past a limit.

    The limit matters for one-off clones over the HTTP API: every new sample adds an entry.
    """

    def __init__(self, folder: Path, max_entries: int = 500) -> None:
        self.folder = Path(folder)
        self.max_entries = max_entries

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def load(self, key: str) -> ClonePrompt | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if data.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {data.get('format')!r}")
            os.utime(path)  # recently used
            return ClonePrompt(
                speaker_embedding=data["speaker_embedding"],
                ref_codes=data["ref_codes"],
                ref_text=data["ref_text"],
            )
        except Exception as err:  # noqa: BLE001 - any unreadable entry is simply rebuilt
            _LOGGER.warning("Cached clone prompt %s is unreadable (%s); computing it again", path.name, err)
            path.unlink(missing_ok=True)
            return None

    def store(self, key: str, prompt: ClonePrompt) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {
            "format": FORMAT_VERSION,
            "speaker_embedding": prompt.speaker_embedding.detach().cpu(),
            "ref_codes": None if prompt.ref_codes is None else prompt.ref_codes.detach().cpu(),
            "ref_text": prompt.ref_text,
        }
        # Write to a temporary file first: a crash mid-write must not leave a torn entry.
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(handle)
        try:
            torch.save(data, temporary)
            os.replace(temporary, self._path(key))
        finally:
            Path(temporary).unlink(missing_ok=True)
        self._trim()

    def _trim(self) -> None:
        entries = sorted(self.folder.glob("*.pt"), key=lambda p: p.stat().st_mtime)
        for stale in entries[: max(0, len(entries) - self.max_entries)]:
            stale.unlink(missing_ok=True)
