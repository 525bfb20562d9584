"""Shared fixtures: random-weight checkpoints built once per test run, and models loaded from them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from wyoming_qwen3tts.dev.tiny_checkpoint import build_checkpoint
from wyoming_qwen3tts.engine.loader import LoadOptions, load_model, resolve_placement

logging.getLogger("qwen_tts").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny CustomVoice and Base checkpoints, written by the project's own generator."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "custom_voice": build_checkpoint(root / "custom_voice", kind="custom_voice", size="tiny", seed=0),
        "base": build_checkpoint(root / "base", kind="base", size="tiny", seed=1),
    }


@pytest.fixture(scope="session")
def cpu_placement():
    return resolve_placement(LoadOptions(device="cpu"))


@pytest.fixture(scope="session")
def custom_voice_model(checkpoints, cpu_placement):
    """The official wrapper around the tiny CustomVoice checkpoint."""
    return load_model(checkpoints["custom_voice"], cpu_placement)


@pytest.fixture(scope="session")
def base_model(checkpoints, cpu_placement):
    """The official wrapper around the tiny Base checkpoint."""
    return load_model(checkpoints["base"], cpu_placement)


def voice_like_sample(seconds: float = 3.0, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-like test signal: harmonics with vibrato under a 4 Hz envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = 140 + 15 * np.sin(2 * np.pi * 5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t))
    noise = 0.02 * rng.standard_normal(t.shape)
    return (0.25 * voiced * envelope + noise).astype(np.float32)


@pytest.fixture(scope="session")
def reference_sample() -> tuple[np.ndarray, int]:
    return voice_like_sample(), 16000
