"""The codec decoder in bfloat16 where the CPU computes in it (`--codec-precision`), float32 elsewhere."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from helpers import greedy_cycle_through_wyoming, is_one_audio_cycle, loudest_sample

from wyoming_qwen3tts.engine import loader
from wyoming_qwen3tts.engine.decode import StreamingCodecDecoder
from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.loader import load_model, resolve_placement
from wyoming_qwen3tts.engine.options import EngineOptions, LoadOptions, StopRules
from wyoming_qwen3tts.engine.quantized_linear import snr_db


@pytest.fixture
def cpu_with_bfloat16(monkeypatch):
    # Whether this CPU has bfloat16 arithmetic decides only the speed of its convolutions, not
    # whether they run: the tests take both answers on any CPU.
    monkeypatch.setattr(loader, "cpu_computes_bfloat16", lambda: True)


def test_auto_leaves_the_codec_as_the_package_loads_it():
    assert resolve_placement(LoadOptions(device="cpu")).codec_dtype is None
    assert resolve_placement(LoadOptions(device="cpu", codec_precision="float32")).codec_dtype == torch.float32


def test_bfloat16_is_refused_with_a_reason_where_the_cpu_has_no_bfloat16_arithmetic(checkpoints, monkeypatch, caplog):
    monkeypatch.setattr(loader, "cpu_computes_bfloat16", lambda: False)
    with caplog.at_level(logging.WARNING):
        placement = resolve_placement(LoadOptions(device="cpu", quantize="none", codec_precision="bfloat16"))
    assert placement.codec_dtype is None
    assert "no bfloat16 arithmetic (AVX512_BF16 or AMX)" in caplog.text and "stays float32" in caplog.text
    wrapper = load_model(checkpoints["custom_voice"], placement)
    assert {p.dtype for p in wrapper.model.speech_tokenizer.model.decoder.parameters()} == {torch.float32}


def test_a_bfloat16_codec_streams_its_own_one_shot_decode_close_to_float32s(checkpoints, custom_voice_model, cpu_with_bfloat16):
    placement = resolve_placement(LoadOptions(device="cpu", quantize="none", codec_precision="bfloat16"))
    wrapper = load_model(checkpoints["custom_voice"], placement)
    codec = wrapper.model.speech_tokenizer.model
    assert {p.dtype for p in codec.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in codec.encoder.parameters()} == {torch.float32}, "clone samples encode as before"

    codes = torch.randint(0, 2048, (40, 16), generator=torch.Generator().manual_seed(3))
    one_shot = wrapper.model.speech_tokenizer.decode([{"audio_codes": codes}])[0][0]
    decoder = StreamingCodecDecoder(codec.decoder)
    state = decoder.new_state()
    streamed = np.concatenate([decoder.decode(state, codes[start:stop]).numpy() for start, stop in ((0, 1), (1, 4), (4, 16), (16, 40))])
    assert streamed.dtype == np.float32 and streamed.shape == one_shot.shape == (40 * 1920,)
    # Chunks stitch without a seam: the streamed audio is the one-shot decode up to bfloat16 rounding.
    assert snr_db(one_shot, streamed) > 30
    # And it is the float32 codec's audio, rounded: a wrong conversion would be noise (about 0 dB).
    full_precision = custom_voice_model.model.speech_tokenizer.decode([{"audio_codes": codes}])[0][0]
    assert snr_db(full_precision, streamed) > 15


async def test_an_engine_with_a_bfloat16_codec_streams_speech_through_wyoming(checkpoints, tmp_path, cpu_with_bfloat16):
    engine = SpeechEngine.load(
        EngineOptions(
            model=str(checkpoints["custom_voice"]),
            load=LoadOptions(device="cpu", quantize="int8", codec_precision="bfloat16"),
            stop=StopRules(base_frames=8, frames_per_token=0, max_frames=8),
            data_dir=tmp_path,
        )
    )
    cycle = await greedy_cycle_through_wyoming(engine)
    assert is_one_audio_cycle(cycle.types) and len(cycle.audio) == 8 * 1920 * 2
    assert loudest_sample(cycle.audio) > 100
