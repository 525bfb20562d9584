"""What the published checkpoints' config files hold beyond what our generator chooses.

The published `config.json` and `speech_tokenizer/config.json` spell out every setting of the
package's config classes (the generator only picks the sizes), plus a few keys the package does
not read but other engines' converters do: the talker's `position_id_per_seconds`, the
sub-configs' `model_type`s, the chat template's `assistant_token_id`, the codec's semantic
quantizer and projection widths, the Mimi encoder's full settings and `_frame_rate`. Completing
our configs with the package's own defaults writes the published values: for every key the
published files and the package share, the package's default is the published value.
"""

from __future__ import annotations

import inspect
from typing import Any

# Keys in the published files that the package's config classes do not take.
TALKER_EXTRAS = {"model_type": "qwen3_tts_talker", "position_id_per_seconds": 13}
CODE_PREDICTOR_EXTRAS = {"model_type": "qwen3_tts_talker_code_predictor"}


def class_defaults(config_class) -> dict[str, Any]:
    """Every setting a config class takes, with its default (JSON-ready)."""
    defaults = {}
    for name, parameter in inspect.signature(config_class.__init__).parameters.items():
        if name in ("self", "kwargs") or parameter.default is inspect.Parameter.empty:
            continue
        value = parameter.default
        defaults[name] = list(value) if isinstance(value, tuple) else value
    return defaults


def completed(config: dict[str, Any], config_class, extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config`` with every setting of ``config_class`` it leaves out, at the class default."""
    full = {**class_defaults(config_class), **(extras or {}), **config}
    return {key: value for key, value in full.items() if value is not None or key in config}


def complete_model_config(config: dict[str, Any], assistant_token_id: int) -> dict[str, Any]:
    """The top-level config.json in the published layout."""
    from qwen_tts.core.models.configuration_qwen3_tts import (
        Qwen3TTSSpeakerEncoderConfig,
        Qwen3TTSTalkerCodePredictorConfig,
        Qwen3TTSTalkerConfig,
    )

    talker = dict(config["talker_config"])
    talker["code_predictor_config"] = completed(
        talker["code_predictor_config"], Qwen3TTSTalkerCodePredictorConfig, CODE_PREDICTOR_EXTRAS
    )
    return {
        **config,
        "assistant_token_id": assistant_token_id,
        "talker_config": completed(talker, Qwen3TTSTalkerConfig, TALKER_EXTRAS),
        "speaker_encoder_config": completed(config["speaker_encoder_config"], Qwen3TTSSpeakerEncoderConfig),
    }


def complete_codec_config(config: dict[str, Any]) -> dict[str, Any]:
    """speech_tokenizer/config.json in the published layout."""
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2DecoderConfig
    from transformers import MimiConfig

    decoder = config["decoder_config"]
    decoder_extras = {
        "num_semantic_quantizers": 1,
        "semantic_codebook_size": 2 * decoder["codebook_size"],
        "vector_quantization_hidden_dimension": decoder["codebook_dim"],
    }
    encoder = config["encoder_config"]
    return {
        **config,
        "encoder_config": completed(encoder, MimiConfig, {"_frame_rate": encoder["frame_rate"]}),
        "decoder_config": completed(decoder, Qwen3TTSTokenizerV2DecoderConfig, decoder_extras),
    }
