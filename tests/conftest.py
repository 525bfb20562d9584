"""Shared fixtures: random-weight checkpoints built once per test run, and models loaded from them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import voice_like_sample

from wyoming_qwen3tts.dev.tiny_checkpoint import build_checkpoint
from wyoming_qwen3tts.engine import generate as generate_module
from wyoming_qwen3tts.engine.loader import LoadOptions, load_model, resolve_placement
from wyoming_qwen3tts.engine.sampling import ExponentialNoise

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
    return resolve_placement(LoadOptions(device="cpu", quantize="none"))


@pytest.fixture(scope="session")
def custom_voice_model(checkpoints, cpu_placement):
    """The official wrapper around the tiny CustomVoice checkpoint."""
    return load_model(checkpoints["custom_voice"], cpu_placement)


@pytest.fixture(scope="session")
def unhooked_speech_tokenizer(checkpoints, cpu_placement):
    """The tiny CustomVoice speech tokenizer, loaded again, to be deep-copied by tests that want a
    private codec: streaming decoders wrap `custom_voice_model`'s layers (any test may do so first),
    and a module with those wrappers cannot be deep-copied."""
    return load_model(checkpoints["custom_voice"], cpu_placement).model.speech_tokenizer


@pytest.fixture(scope="session")
def base_model(checkpoints, cpu_placement):
    """The official wrapper around the tiny Base checkpoint."""
    return load_model(checkpoints["base"], cpu_placement)


@pytest.fixture(scope="session")
def reference_sample() -> tuple[np.ndarray, int]:
    return voice_like_sample(), 16000


@pytest.fixture
def seeds_draw_for_the_top_k(monkeypatch):
    """Seeded requests draw as unseeded ones do (for the top-k candidates only, not the stock
    numbers), so that the compiled loop's graph, made for unseeded requests, can be checked
    against the eager loop with the same draws."""
    monkeypatch.setattr(
        generate_module, "ExponentialNoise", lambda generator, stock_stream: ExponentialNoise(generator, stock_stream=False)
    )
