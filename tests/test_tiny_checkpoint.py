"""The random-weight checkpoint generator writes the published layout."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from wyoming_qwen3tts.dev.tiny_checkpoint import GENERATION_CONFIG, model_config, write_text_tokenizer
from wyoming_qwen3tts.engine.qwen_import import import_qwen_tts

PUBLISHED_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "speech_tokenizer/config.json",
    "speech_tokenizer/model.safetensors",
    "speech_tokenizer/preprocessor_config.json",
]


def test_command_line_writes_a_base_checkpoint_in_the_published_layout(tmp_path):
    out = tmp_path / "base"
    result = subprocess.run(
        [sys.executable, "-m", "wyoming_qwen3tts.dev.tiny_checkpoint", str(out), "--kind", "base"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for name in PUBLISHED_FILES:
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["tts_model_type"] == "base"
    assert config["speaker_encoder_config"]["enc_dim"] == config["talker_config"]["hidden_size"]
    assert "model_type" not in config["speaker_encoder_config"]
    assert json.loads((out / "generation_config.json").read_text()) == GENERATION_CONFIG


def test_checkpoints_open_with_the_official_loader(custom_voice_model, base_model):
    assert custom_voice_model.model.tts_model_type == "custom_voice"
    assert base_model.model.tts_model_type == "base"
    assert len(custom_voice_model.get_supported_speakers()) == 9
    assert base_model.model.speaker_encoder is not None


def test_tiny_checkpoint_is_audible(custom_voice_model):
    wavs, sample_rate = custom_voice_model.generate_custom_voice(
        "Hello there.", speaker="serena", language="english", max_new_tokens=12
    )
    rms = float(np.sqrt(np.mean(wavs[0] ** 2)))
    assert sample_rate == 24000
    assert 0.02 < rms < 0.6, rms


@pytest.mark.parametrize(("kind", "published_millions"), [("custom_voice", 906), ("base", 915)])
def test_real_size_config_builds_a_model_of_the_published_size(tmp_path, kind, published_millions):
    """The published checkpoints hold 906 M (CustomVoice) and 915 M (Base) parameters without the codec."""
    import_qwen_tts()
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    config = model_config(kind, "real-0.6b", write_text_tokenizer(tmp_path))
    with torch.device("meta"):  # shapes only, no memory
        model = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**config))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(millions - published_millions) < 1, millions
    if kind == "custom_voice":
        talker = config["talker_config"]
        assert talker["spk_id"]["ryan"] == 3061 and talker["spk_is_dialect"]["dylan"] == "beijing_dialect"


def test_configs_hold_every_setting_of_the_package_s_config_classes_and_the_published_extras(checkpoints):
    """Other engines' converters read the published files whole; ours must not lack a key."""
    import_qwen_tts()
    from qwen_tts.core.models.configuration_qwen3_tts import (
        Qwen3TTSConfig,
        Qwen3TTSSpeakerEncoderConfig,
        Qwen3TTSTalkerCodePredictorConfig,
        Qwen3TTSTalkerConfig,
    )
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import (
        Qwen3TTSTokenizerV2Config,
        Qwen3TTSTokenizerV2DecoderConfig,
    )
    from safetensors import safe_open
    from transformers import MimiConfig

    from wyoming_qwen3tts.dev.published_layout import class_defaults

    folder = checkpoints["custom_voice"]
    config = json.loads((folder / "config.json").read_text())
    codec = json.loads((folder / "speech_tokenizer" / "config.json").read_text())
    sections = [
        (config, Qwen3TTSConfig),
        (config["talker_config"], Qwen3TTSTalkerConfig),
        (config["talker_config"]["code_predictor_config"], Qwen3TTSTalkerCodePredictorConfig),
        (config["speaker_encoder_config"], Qwen3TTSSpeakerEncoderConfig),
        (codec, Qwen3TTSTokenizerV2Config),
        (codec["encoder_config"], MimiConfig),
        (codec["decoder_config"], Qwen3TTSTokenizerV2DecoderConfig),
    ]
    for section, config_class in sections:
        expected = {name for name, default in class_defaults(config_class).items() if default is not None}
        assert expected <= section.keys(), f"{config_class.__name__} lacks {sorted(expected - section.keys())}"

    talker = config["talker_config"]
    assert talker["position_id_per_seconds"] == 13 and talker["model_type"] == "qwen3_tts_talker"
    assert talker["code_predictor_config"]["model_type"] == "qwen3_tts_talker_code_predictor"
    tokenizer = write_text_tokenizer(folder.parent / "tokenizer-probe")
    assert config["assistant_token_id"] == tokenizer.assistant
    decoder = codec["decoder_config"]
    assert decoder["num_semantic_quantizers"] == 1 and decoder["vector_quantization_hidden_dimension"] == decoder["codebook_dim"]
    assert codec["encoder_config"]["_frame_rate"] == 12.5
    with safe_open(folder / "speech_tokenizer" / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float32}, "the codec ships in float32"
