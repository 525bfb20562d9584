"""The speech vocabulary every layer speaks: backends, jobs, audio chunks, options, voice kinds.

This module imports neither torch nor any edge, so the Wyoming server, the HTTP app and the
remote engine can run without the model. A backend is whatever turns text into audio: the
local engine (`engine.engine.SpeechEngine`) or speech servers elsewhere
(`remote.engine.RemoteEngine`); both implement `SpeechBackend`, and their jobs `SpeechJob`.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 24000
SAMPLE_WIDTH = 2  # bytes: 16-bit PCM
CHANNELS = 1
FRAME_SECONDS = 0.08  # one codec frame (12.5 Hz)
AUDIO_FORMAT = {"rate": SAMPLE_RATE, "width": SAMPLE_WIDTH, "channels": CHANNELS}

# The languages of the published Qwen3-TTS checkpoints, as the package spells them ("auto" first).
PUBLISHED_LANGUAGES = (
    "auto", "chinese", "english", "german", "italian", "portuguese", "spanish", "japanese", "korean", "french", "russian",
)


@dataclass(frozen=True)
class AudioChunk:
    """A piece of a job's audio: float32 at 24 kHz, mono."""

    audio: np.ndarray
    segment: int = 0  # which text segment of the request
    first_frame: int = 0  # index of this chunk's first frame within its segment

    @property
    def frames(self) -> int:
        """80 ms frames in this chunk."""
        return round(len(self.audio) / (SAMPLE_RATE * FRAME_SECONDS))

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    @property
    def pcm(self) -> bytes:
        """16-bit little-endian PCM."""
        return pcm16(self.audio)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0


@dataclass
class JobStats:
    """What a job did, for the request log and benchmarks."""

    created: float = field(default_factory=time.monotonic)
    characters: int = 0
    first_audio: float | None = None  # monotonic time the first chunk was handed out
    audio_seconds: float = 0.0
    frames: int = 0
    segments: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    finished: float | None = None

    def record(self, chunk: AudioChunk) -> None:
        """Count a chunk handed to the listener."""
        if self.first_audio is None:
            self.first_audio = time.monotonic()
        self.audio_seconds += chunk.seconds
        self.frames += chunk.frames

    def end_segment(self, reason: str) -> None:
        self.segments += 1
        self.finish_reasons.append(reason)

    @property
    def time_to_first_audio(self) -> float | None:
        return None if self.first_audio is None else self.first_audio - self.created

    @property
    def real_time_factor(self) -> float | None:
        """Audio seconds per wall second (above 1 is faster than real time)."""
        if self.finished is None or self.audio_seconds == 0:
            return None
        return self.audio_seconds / max(self.finished - self.created, 1e-9)


class JobCancelled(Exception):
    """The job was cancelled before it finished."""


class BackendUnavailableError(RuntimeError):
    """No backend can be opened (model missing, no remote answering); the message says what to do."""


@dataclass(frozen=True)
class SamplingOptions:
    """How the talker (codebook 0) and the code predictor (codebooks 1-15) pick codes.

    Defaults are the official ones (the checkpoints' generation_config.json).
    """

    do_sample: bool = True
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 0.9
    repetition_penalty: float = 1.05
    subtalker_do_sample: bool = True
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0
    subtalker_temperature: float = 0.9
    seed: int | None = None

    @classmethod
    def from_generation_config(cls, config: dict[str, Any] | None) -> "SamplingOptions":
        """Defaults from a checkpoint's generation_config.json, where it sets them."""
        config = config or {}
        names = {
            "do_sample": "do_sample",
            "top_k": "top_k",
            "top_p": "top_p",
            "temperature": "temperature",
            "repetition_penalty": "repetition_penalty",
            "subtalker_dosample": "subtalker_do_sample",
            "subtalker_top_k": "subtalker_top_k",
            "subtalker_top_p": "subtalker_top_p",
            "subtalker_temperature": "subtalker_temperature",
        }
        return cls(**{ours: config[theirs] for theirs, ours in names.items() if theirs in config})

    def greedy(self) -> "SamplingOptions":
        """The same options with sampling switched off for both stages."""
        return replace(self, do_sample=False, subtalker_do_sample=False)

    def with_seed(self, seed: int | None) -> "SamplingOptions":
        return replace(self, seed=seed)


@dataclass(frozen=True)
class RequestOptions:
    """Per-request choices; None means the backend's, the checkpoint's or the package's default."""

    language: str = "auto"
    sampling: SamplingOptions | None = None
    seed: int | None = None
    non_streaming_mode: bool | None = None  # None: the package's default for the voice type
    instruct: str | None = None
    max_frames: int | None = None  # a tighter absolute frame cap for this request

    def __post_init__(self) -> None:
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, not {self.max_frames}")

    def updated(self, **changes: Any) -> "RequestOptions":
        """These options with every change that is not None applied."""
        return replace(self, **{name: value for name, value in changes.items() if value is not None})


# Voice kinds: what a backend is asked to speak with.


@dataclass(frozen=True)
class PresetSpeaker:
    """One of the speakers in a CustomVoice checkpoint's table."""

    name: str


@dataclass(frozen=True)
class ClonePrompt:
    """A voice cloned from a reference sample by the local Base model.

    ``ref_codes`` (frames x 16 tensor) and ``ref_text`` are set in in-context mode; x-vector-only
    mode uses the speaker embedding (a tensor) alone.
    """

    speaker_embedding: Any
    ref_codes: Any = None
    ref_text: str | None = None

    @property
    def x_vector_only(self) -> bool:
        return self.ref_codes is None


@dataclass(frozen=True)
class ReferenceClone:
    """A clone voice a remote server computes: its sample's bytes and transcript."""

    audio: bytes
    mime: str
    transcript: str | None

    @property
    def key(self) -> str:
        digest = hashlib.sha256(self.audio)
        digest.update((self.transcript or "").encode())
        return digest.hexdigest()[:16]

    @property
    def data_uri(self) -> str:
        return f"data:{self.mime};base64," + base64.b64encode(self.audio).decode()

    @classmethod
    def from_sample(cls, audio: bytes, filename: str, transcript: str | None) -> "ReferenceClone":
        mime = mimetypes.guess_type(Path(filename).name)[0] or "audio/wav"
        return cls(audio=audio, mime=mime, transcript=transcript)


VoiceSpec = PresetSpeaker | ClonePrompt | ReferenceClone
CLONE_KINDS = (ClonePrompt, ReferenceClone)


@dataclass(frozen=True)
class CloneSource:
    """A checked reference sample to clone a voice from (see `reference_audio.ReferenceAudio`)."""

    audio_bytes: bytes  # the file as given, for cache keys and remote uploads
    samples: np.ndarray  # float32 mono
    sample_rate: int
    transcript: str | None  # None: clone the timbre alone (x-vector mode)
    filename: str = "sample.wav"


# The protocols.


@runtime_checkable
class SpeechJob(Protocol):
    """One request: text segments in (also while it runs), audio chunks out, in order.

    Call every method from the event loop the job was started on.
    """

    stats: JobStats

    def add_text(self, text: str) -> None:
        """Queue one whole segment (normally a sentence); blank text is skipped."""

    def append_text(self, piece: str) -> None:
        """Stream text into the open segment; speech may start before the segment is complete."""

    def close_segment(self) -> None:
        """End the open segment: later text starts a new one."""

    def finish(self) -> None:
        """No more text will come; the chunks end once everything queued is spoken."""

    def cancel(self) -> None:
        """Stop as soon as possible; iteration ends with `JobCancelled`."""

    def __aiter__(self) -> AsyncIterator[AudioChunk]:
        """The audio, chunk by chunk; raises `JobCancelled`, or the error that failed the job."""


@runtime_checkable
class SpeechBackend(Protocol):
    """What turns text into speech for the edges."""

    @property
    def speakers(self) -> list[str]:
        """Preset speakers, in the backend's order."""

    def speaker_dialect(self, speaker: str) -> str | None:
        """The dialect a preset speaker speaks, when the backend knows it."""

    @property
    def languages(self) -> list[str]:
        """Languages a request may name ("auto" first)."""

    @property
    def can_clone(self) -> bool:
        """Whether `clone` works here."""

    @property
    def active_jobs(self) -> int:
        """Jobs started and not yet ended."""

    @property
    def ready(self) -> bool:
        """Whether the backend knows its voices (a remote one may not have answered yet)."""

    async def wait_ready(self) -> None:
        """Return once `ready`; keeps trying for as long as it takes."""

    def streams_text(self, voice: VoiceSpec) -> bool:
        """Whether text appended to a job in this voice is spoken before its segment is complete."""

    async def clone(self, source: CloneSource) -> tuple[VoiceSpec, bool]:
        """A voice for a reference sample, and whether it had to be computed (not cached)."""

    def start(self, voice: VoiceSpec, request: RequestOptions = RequestOptions()) -> SpeechJob:
        """A new job speaking in ``voice``; raises ValueError for a voice the backend cannot speak."""

    async def aclose(self) -> None:
        """Stop every job and free what the backend holds."""
