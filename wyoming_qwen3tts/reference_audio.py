"""Reference samples for voice clones: read with soundfile, checked, brought to 24 kHz mono."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from .speech import CloneSource

_LOGGER = logging.getLogger(__name__)

SAMPLE_RATE = 24000
MIN_SECONDS, MAX_SECONDS = 1.0, 30.0
GOOD_MIN_SECONDS, GOOD_MAX_SECONDS = 3.0, 15.0
SILENCE_RMS = 10 ** (-50 / 20)  # -50 dBFS
CLIPPED_LEVEL = 0.999
MAX_CLIPPED_FRACTION = 0.01

GOOD_SAMPLE = (
    "A good sample is 3-15 seconds of one person speaking clearly, with no music or background "
    "noise, recorded without distortion (peaks well below full scale)."
)


class ReferenceAudioError(ValueError):
    """The sample cannot be used; the message says why and what a good sample is."""


@dataclass(frozen=True)
class ReferenceAudio:
    """A checked sample, ready for the model."""

    samples: np.ndarray  # float32, mono, 24 kHz
    source_rate: int
    source_channels: int

    sample_rate: int = SAMPLE_RATE

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def read_reference(source: Path | bytes, label: str) -> ReferenceAudio:
    """Read and check a sample from a file or from bytes (wav, flac, ogg, mp3, ...)."""
    try:
        with soundfile.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as handle:
            audio = handle.read(dtype="float32", always_2d=True)
            rate, channels = handle.samplerate, handle.channels
    except (soundfile.LibsndfileError, RuntimeError, OSError, TypeError) as err:
        raise ReferenceAudioError(
            f"{label}: cannot read the audio ({err}). Use a wav, flac, ogg or mp3 file."
        ) from err
    return check_reference(audio, rate, label, channels)


def check_reference(audio: np.ndarray, rate: int, label: str, channels: int | None = None) -> ReferenceAudio:
    """Mix down, check length and level, resample to 24 kHz."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        channels = audio.shape[1]
        audio = audio.mean(axis=1)
    channels = channels or 1
    if rate <= 0 or audio.size == 0:
        raise ReferenceAudioError(f"{label}: the file holds no audio. {GOOD_SAMPLE}")
    seconds = audio.size / rate
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise ReferenceAudioError(
            f"{label}: the sample is {seconds:.1f} s long; it must be between {MIN_SECONDS:.0f} and "
            f"{MAX_SECONDS:.0f} s. {GOOD_SAMPLE}"
        )
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    if rms < SILENCE_RMS:
        raise ReferenceAudioError(f"{label}: the sample is silent (level {20 * np.log10(max(rms, 1e-12)):.0f} dBFS). {GOOD_SAMPLE}")
    clipped = float(np.mean(np.abs(audio) >= CLIPPED_LEVEL))
    if clipped > MAX_CLIPPED_FRACTION:
        raise ReferenceAudioError(
            f"{label}: {clipped:.1%} of the sample is clipped at full scale, so the clone would copy "
            f"the distortion. Record it again at a lower level. {GOOD_SAMPLE}"
        )
    if not GOOD_MIN_SECONDS <= seconds <= GOOD_MAX_SECONDS:
        _LOGGER.warning(
            "%s: the sample is %.1f s long; clones are best from %.0f-%.0f s of speech",
            label,
            seconds,
            GOOD_MIN_SECONDS,
            GOOD_MAX_SECONDS,
        )
    if rate != SAMPLE_RATE:
        import librosa  # the official package's own resampler (soxr)

        audio = librosa.resample(audio, orig_sr=rate, target_sr=SAMPLE_RATE, res_type="soxr_hq")
    return ReferenceAudio(samples=np.ascontiguousarray(audio, dtype=np.float32), source_rate=rate, source_channels=channels)


def clone_source(audio_bytes: bytes, label: str, transcript: str | None, filename: str = "sample.wav") -> CloneSource:
    """A checked sample to clone from; raises ReferenceAudioError with advice when it is unusable."""
    audio = read_reference(audio_bytes, label)
    return CloneSource(
        audio_bytes=audio_bytes,
        samples=audio.samples,
        sample_rate=audio.sample_rate,
        transcript=transcript,
        filename=filename,
    )
