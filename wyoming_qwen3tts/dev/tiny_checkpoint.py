"""Write random-weight Qwen3-TTS 12 Hz checkpoints in the published on-disk layout.

No machine we build or test on can download the real weights, so tests and benchmarks run the
official `qwen_tts` classes on checkpoints made here:

* ``tiny``: a few hundred thousand parameters, builds in seconds, for tests;
* ``real-0.6b``: the published 0.6B dimensions (from ``real-0.6b.json``), for speed and memory.

The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors``, the text
tokenizer files and ``speech_tokenizer/{config.json, model.safetensors,
preprocessor_config.json}``, so both our loader and ``Qwen3TTSModel.from_pretrained`` open it
exactly as they open a real checkpoint.

    python -m wyoming_qwen3tts.dev.tiny_checkpoint OUT --kind custom_voice|base [--size tiny|real-0.6b]
        [--text-vocabulary qwen.tiktoken]

The text tokenizer is a small one trained on a few lines, or, with ``--text-vocabulary``, Qwen's
own (see ``qwen_vocabulary``): benchmarks need it, or every prompt is about twice as long as the
real model's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from ..engine.qwen_import import import_qwen_tts
from .published_layout import complete_codec_config, complete_model_config
from .qwen_vocabulary import read_ranks
from .text_tokenizer import TextTokenIds, write_qwen_tokenizer, write_text_tokenizer

KINDS = ("custom_voice", "base")
SIZES = ("tiny", "real-0.6b")

# The published generation_config.json of every Qwen3-TTS 12 Hz checkpoint.
GENERATION_CONFIG = {
    "do_sample": True,
    "repetition_penalty": 1.05,
    "temperature": 0.9,
    "top_p": 1.0,
    "top_k": 50,
    "subtalker_dosample": True,
    "subtalker_temperature": 0.9,
    "subtalker_top_p": 1.0,
    "subtalker_top_k": 50,
    "max_new_tokens": 8192,
}

# The published 12 Hz tokenizer's feature extractor (Mimi's).
PREPROCESSOR_CONFIG = {
    "chunk_length_s": None,
    "feature_extractor_type": "EncodecFeatureExtractor",
    "feature_size": 1,
    "overlap": None,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "sampling_rate": 24000,
}

def _real_dimensions() -> dict[str, Any]:
    path = Path(__file__).with_name("real-0.6b.json")
    return json.loads(path.read_text(encoding="utf-8"))


def model_config(kind: str, size: str, ids: TextTokenIds) -> dict[str, Any]:
    """The top-level config.json for a checkpoint of this kind and size."""
    real = _real_dimensions()
    talker_real = real["talker"]
    if size == "real-0.6b":
        talker = {k: v for k, v in talker_real.items() if k != "rope_scaling"}
        talker["rope_scaling"] = {
            "rope_type": "default",
            "mrope_section": talker_real["rope_scaling"]["mrope_section"],
            "interleaved": True,
        }
        code_predictor = dict(real["code_predictor"])
        speaker_encoder = {"enc_dim": talker["hidden_size"]}
    else:
        # Talker and code predictor widths differ on purpose: that is the 1.7B layout, and it
        # exercises the projection between them.
        talker = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": talker_real["vocab_size"],
            "text_vocab_size": ids.vocab_size,
            "text_hidden_size": 48,
            "max_position_embeddings": 4096,
            "rope_theta": 10000,
            "rms_norm_eps": 1e-6,
            "rope_scaling": {"rope_type": "default", "mrope_section": [3, 3, 2], "interleaved": True},
            "num_code_groups": 16,
        }
        for key in ("codec_pad_id", "codec_bos_id", "codec_eos_token_id", "codec_think_id",
                    "codec_nothink_id", "codec_think_bos_id", "codec_think_eos_id"):
            talker[key] = talker_real[key]
        code_predictor = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "vocab_size": real["code_predictor"]["vocab_size"],
            "max_position_embeddings": 64,
            "rope_theta": 10000,
            "num_code_groups": 16,
        }
        speaker_encoder = {
            "enc_dim": talker["hidden_size"],
            "enc_channels": [16, 16, 16, 16, 48],
            "enc_attention_channels": 8,
            "enc_se_channels": 8,
        }
    talker["hidden_act"] = "silu"
    talker["code_predictor_config"] = {**code_predictor, "hidden_act": "silu", "rms_norm_eps": 1e-6}

    if kind == "custom_voice":
        talker["spk_id"] = dict(real["custom_voice_speakers"])
        talker["spk_is_dialect"] = {
            name: real["speaker_dialects"].get(name, False) for name in real["custom_voice_speakers"]
        }
    else:
        talker["spk_id"] = {}
        talker["spk_is_dialect"] = {}
    talker["codec_language_id"] = dict(real["languages"])

    return {
        "architectures": ["Qwen3TTSForConditionalGeneration"],
        "model_type": "qwen3_tts",
        "tokenizer_type": "qwen3_tts_tokenizer_12hz",
        "tts_model_size": "0b6",
        "tts_model_type": kind,
        "im_start_token_id": ids.im_start,
        "im_end_token_id": ids.im_end,
        "tts_pad_token_id": ids.tts_pad,
        "tts_bos_token_id": ids.tts_bos,
        "tts_eos_token_id": ids.tts_eos,
        "talker_config": talker,
        "speaker_encoder_config": {**speaker_encoder, "sample_rate": 24000},
    }


def speech_tokenizer_config(size: str) -> dict[str, Any]:
    """speech_tokenizer/config.json: the 12 Hz codec (Mimi encoder + causal decoder)."""
    real = _real_dimensions()["speech_tokenizer_12hz"]
    if size == "real-0.6b":
        decoder = {k: v for k, v in real["decoder"].items()}
        mimi = real["encoder_mimi"]
        encoder = {
            "hidden_size": mimi["hidden_size"],
            "num_hidden_layers": mimi["num_hidden_layers"],
            "num_attention_heads": mimi["num_attention_heads"],
            "num_key_value_heads": mimi["num_attention_heads"],
            "head_dim": mimi["head_dim"],
            "intermediate_size": mimi["intermediate_size"],
            "sliding_window": mimi["sliding_window"],
            "num_quantizers": mimi["num_quantizers"],
            "codebook_size": mimi["codebook_size"],
            "codebook_dim": mimi["codebook_dim"],
            "upsampling_ratios": mimi["upsampling_ratios"],
        }
    else:
        # Real frame geometry (1920 samples per frame, 72-frame window), tiny widths.
        decoder = {
            "latent_dim": 32,
            "codebook_dim": 16,
            "codebook_size": real["decoder"]["codebook_size"],
            "decoder_dim": 32,
            "hidden_size": 32,
            "intermediate_size": 64,
            "head_dim": 16,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "num_hidden_layers": 2,
            "num_quantizers": 16,
            "sliding_window": real["decoder"]["sliding_window"],
            "upsample_rates": real["decoder"]["upsample_rates"],
            "upsampling_ratios": real["decoder"]["upsampling_ratios"],
        }
        encoder = {
            "hidden_size": 32,
            "num_filters": 4,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 64,
            "num_quantizers": 16,
            "codebook_size": real["decoder"]["codebook_size"],
            "codebook_dim": 16,
            "vector_quantization_hidden_dimension": 16,
            "upsample_groups": 32,
            "upsampling_ratios": real["encoder_mimi"]["upsampling_ratios"],
        }
    encoder.update(sampling_rate=24000, frame_rate=12.5, use_cache=False)
    return {
        "architectures": ["Qwen3TTSTokenizerV2Model"],
        "model_type": "qwen3_tts_tokenizer_12hz",
        "encoder_valid_num_quantizers": 16,
        "input_sample_rate": 24000,
        "output_sample_rate": 24000,
        "decode_upsample_rate": 1920,
        "encode_downsample_rate": 1920,
        "encoder_config": encoder,
        "decoder_config": decoder,
    }


def _make_codec_audible(codec: torch.nn.Module, generator: torch.Generator) -> None:
    """Give the codec weights that produce sound.

    A freshly initialised codec has all-zero codebooks and so decodes every code to exact
    silence. Every weight is drawn at a fan-in scale instead, then the output layer is scaled so
    random codes decode to a clearly audible signal that rarely clips.
    """
    with torch.no_grad():
        for name, param in codec.named_parameters():
            if name.endswith(("embedding_sum", "embed_sum")):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name.endswith(("cluster_usage", "alpha", "beta", ".scale", "gamma")):
                continue  # keep the package's neutral initial values
            elif param.dim() >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
        for name, buffer in codec.named_buffers():
            if name.endswith("embed_sum"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator))

        decoder = codec.decoder
        final_conv = decoder.decoder[-1].conv
        captured: list[torch.Tensor] = []
        hook = final_conv.register_forward_hook(lambda _m, _i, output: captured.append(output))
        codes = torch.randint(0, decoder.config.codebook_size, (1, 16, 8), generator=generator)
        decoder(codes)
        hook.remove()
        rms = captured[0].float().pow(2).mean().sqrt().item()  # before the decoder's clamp
        final_conv.weight.mul_(0.2 / max(rms, 1e-6))


def _randomise_talker_scale(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Widen the talker's logit spread so greedy decoding is not a coin toss between near-ties."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("codec_head.weight", "lm_head.0.weight")) or ".lm_head." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def build_checkpoint(
    out: Path,
    kind: str = "custom_voice",
    size: str = "tiny",
    seed: int = 0,
    text_vocabulary: Path | None = None,
    model_dtype: torch.dtype | None = None,
) -> Path:
    """Write a random-weight checkpoint folder and return its path.

    ``model_dtype``: how the file stores the model (the codec is float32 either way); None: as
    published for real sizes (bfloat16), float32 for tiny ones (the tests' models use the weights
    as drawn).

    ``text_vocabulary``: Qwen's BPE ranks file (``qwen.tiktoken``) for a tokenizer that splits
    text as the real model's does; without it, a small trained one.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, not {size!r}")
    qwen_tts = import_qwen_tts()
    from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    del qwen_tts
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # HF initialisers draw from the global generator
    # As published: the model in bfloat16, the codec in float32.
    save_dtype = model_dtype or (torch.bfloat16 if size == "real-0.6b" else torch.float32)

    if text_vocabulary is not None:
        ids = write_qwen_tokenizer(out, read_ranks(Path(text_vocabulary)))
    else:
        if size == "real-0.6b":
            print(
                "warning: a small text tokenizer splits English into about 2.3x the real model's "
                "tokens, so prompts and prefills are longer than real ones; for benchmarks pass "
                "--text-vocabulary (python -m wyoming_qwen3tts.dev.qwen_vocabulary fetches it)",
                file=sys.stderr,
            )
        ids = write_text_tokenizer(out)
    config_dict = complete_model_config(model_config(kind, size, ids), ids.assistant)
    config = Qwen3TTSConfig(**{k: v for k, v in config_dict.items() if k not in ("architectures", "model_type")})
    model = Qwen3TTSForConditionalGeneration(config)
    if size == "tiny":
        _randomise_talker_scale(model, generator)
    model.to(save_dtype).save_pretrained(str(out), safe_serialization=True)
    del model
    # save_pretrained writes what the package reads back wrongly (an empty speaker encoder
    # model_type) and omits what it needs: write the published config instead.
    (out / "config.json").write_text(json.dumps(config_dict, indent=2), encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2), encoding="utf-8")

    codec_dir = out / "speech_tokenizer"
    codec_dir.mkdir(exist_ok=True)
    codec_dict = complete_codec_config(speech_tokenizer_config(size))
    codec_config = Qwen3TTSTokenizerV2Config(
        **{k: v for k, v in codec_dict.items() if k not in ("architectures", "model_type")}
    )
    codec = Qwen3TTSTokenizerV2Model(codec_config)
    _make_codec_audible(codec, generator)
    codec.to(torch.float32).save_pretrained(str(codec_dir), safe_serialization=True)
    (codec_dir / "config.json").write_text(json.dumps(codec_dict, indent=2), encoding="utf-8")
    (codec_dir / "preprocessor_config.json").write_text(
        json.dumps(PREPROCESSOR_CONFIG, indent=2), encoding="utf-8"
    )
    for stray in ("generation_config.json",):
        (codec_dir / stray).unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--kind", choices=KINDS, default="custom_voice")
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--text-vocabulary",
        type=Path,
        help="Qwen's BPE ranks (qwen.tiktoken; python -m wyoming_qwen3tts.dev.qwen_vocabulary fetches it)",
    )
    parser.add_argument(
        "--model-dtype",
        choices=("float32", "bfloat16"),
        help="how the file stores the model (default: bfloat16 for real sizes, as published; float32 for tiny)",
    )
    args = parser.parse_args(argv)
    path = build_checkpoint(
        args.out,
        kind=args.kind,
        size=args.size,
        seed=args.seed,
        text_vocabulary=args.text_vocabulary,
        model_dtype=getattr(torch, args.model_dtype) if args.model_dtype else None,
    )
    print(path)


if __name__ == "__main__":
    main()
