"""Float weights in oneDNN's layout on AVX-512 CPUs: the float product, a row's numbers whatever
rows are beside it, and a model that speaks with them.

Whether this CPU has AVX-512 decides only the speed of the packed layout, not whether it runs:
the tests that load a model take the AVX-512 answer on any x86 CPU, and pack the tiny model's
small layers too (`MIN_WEIGHTS`), which the server leaves alone.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref

import pytest
import torch
import torch.nn.functional as F

from helpers import TEXTS, generate_rows, greedy_cycle_through_wyoming, is_one_audio_cycle, loudest_sample

from wyoming_qwen3tts.engine import packed_weights
from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.generate import FrameGenerator
from wyoming_qwen3tts.engine.loader import load_model, resolve_placement
from wyoming_qwen3tts.engine.options import EngineOptions, LoadOptions, StopRules
from wyoming_qwen3tts.engine.packed_weights import PackedFloatWeights, packing_fault
from wyoming_qwen3tts.engine.prompt import build_prompt
from wyoming_qwen3tts.engine.quantize import replace_talker_linears
from wyoming_qwen3tts.engine.quantized_linear import Int8Weights, PreparedLinear, WeightSlice, onednn_linear
from wyoming_qwen3tts.speech import PresetSpeaker, SamplingOptions

pytestmark = pytest.mark.skipif(not onednn_linear(), reason="this PyTorch has no oneDNN linear for CPU tensors")

SPEAKERS = ["ryan", "vivian", "aiden", "serena"]


def _weights(dtype: torch.dtype, out_features: int = 768, in_features: int = 512):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype)
    return weight, bias


@pytest.fixture
def avx512_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(packed_weights, "MIN_WEIGHTS", 0)
    packing_fault.cache_clear()
    yield
    packing_fault.cache_clear()


def _kernels(model) -> set[type]:
    """The kinds of weights behind the talker's linear layers (a fused matrix's kind for its parts)."""
    return {
        type(module.weights.fused if isinstance(module.weights, WeightSlice) else module.weights) if isinstance(module, PreparedLinear) else type(module)
        for module in model.talker.modules()
        if isinstance(module, (PreparedLinear, torch.nn.Linear))
    }


def test_packed_float32_weights_give_the_float_product_for_a_row_a_batch_and_a_prompt():
    weight, bias = _weights(torch.float32)
    packed = PackedFloatWeights(weight, bias)
    for shape in ((1, 1, 512), (2, 1, 512), (3, 1, 512), (8, 1, 512), (1, 40, 512), (5, 512)):
        x = torch.randn(shape)
        out = packed(x)
        assert out.shape == (*shape[:-1], 768), shape
        torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    strided = torch.randn(4, 3, 512)[:, -1]  # the last position of each row of a batch
    torch.testing.assert_close(packed(strided), F.linear(strided, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_row_s_packed_product_is_the_same_alone_and_beside_any_rows(dtype):
    if not onednn_linear(dtype):
        pytest.skip(f"oneDNN has no {dtype} product on this CPU")
    weight, bias = _weights(dtype, 1024, 3072)
    packed = PackedFloatWeights(weight, bias)
    rows = torch.randn(40, 3072).to(dtype)
    alone = packed(rows[:1])
    for count in (2, 3, 4, 5, 8, 13, 16, 40):
        assert torch.equal(packed(rows[:count])[:1], alone), f"the first row's product changed beside {count - 1} others"


def test_packing_is_refused_with_a_reason_on_a_cpu_without_avx512(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    packing_fault.cache_clear()
    try:
        assert "not AVX-512" in packing_fault(torch.float32)
        assert not resolve_placement(LoadOptions(device="cpu", quantize="none")).packed_float_weights
    finally:
        packing_fault.cache_clear()


def test_float_weights_are_packed_only_where_nothing_else_prepares_them(avx512_cpu):
    assert resolve_placement(LoadOptions(device="cpu", quantize="none")).packed_float_weights
    assert not resolve_placement(LoadOptions(device="cpu", quantize="int8")).packed_float_weights, "int8 packs its own"
    assert not resolve_placement(LoadOptions(device="cpu", quantize="none", compile=True)).packed_float_weights


def test_loading_packs_every_talker_and_predictor_linear_and_logs_it(checkpoints, avx512_cpu, caplog):
    with caplog.at_level(logging.INFO):
        wrapper = load_model(checkpoints["custom_voice"], resolve_placement(LoadOptions(device="cpu", quantize="none")))
    assert _kernels(wrapper.model) == {PackedFloatWeights}
    assert "in oneDNN's layout for this AVX-512 CPU" in caplog.text
    quantized = load_model(checkpoints["custom_voice"], resolve_placement(LoadOptions(device="cpu", quantize="int8")))
    assert _kernels(quantized.model) == {Int8Weights}


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_packed_streams_give_exactly_the_codes_they_give_alone(checkpoints, avx512_cpu, kind):
    wrapper = load_model(checkpoints["custom_voice"], resolve_placement(LoadOptions(device="cpu", quantize="none")))
    assert _kernels(wrapper.model) == {PackedFloatWeights}
    defaults = SamplingOptions.from_generation_config(wrapper.generate_defaults)
    samplings = [SamplingOptions().greedy() if kind == "greedy" else defaults.with_seed(30 + i) for i in range(4)]
    prompts = [build_prompt(wrapper, TEXTS[i % len(TEXTS)] + " Then" * i, PresetSpeaker(SPEAKERS[i]), "english") for i in range(4)]
    generator = FrameGenerator(wrapper.model)
    batched = generate_rows(generator, prompts, samplings, 16)
    for prompt, sampling, codes in zip(prompts, samplings, batched):
        assert torch.equal(generate_rows(generator, [prompt], [sampling], 16)[0], codes)


async def test_an_engine_with_packed_float_weights_streams_speech_through_wyoming(checkpoints, tmp_path, avx512_cpu):
    engine = SpeechEngine.load(
        EngineOptions(
            model=str(checkpoints["custom_voice"]),
            load=LoadOptions(device="cpu", quantize="none"),
            stop=StopRules(base_frames=8, frames_per_token=0, max_frames=8),
            data_dir=tmp_path,
        )
    )
    assert all(_kernels(runtime.wrapper.model) == {PackedFloatWeights} for runtime in engine.runtimes.values())
    cycle = await greedy_cycle_through_wyoming(engine)
    assert is_one_audio_cycle(cycle.types) and len(cycle.audio) == 8 * 1920 * 2
    assert loudest_sample(cycle.audio) > 100


def test_replacing_the_layers_frees_each_replaced_float_weight_at_once(checkpoints):
    """Holding every replaced layer until the end kept float32's load peak 0.5 GB higher (real-size)."""
    placement = dataclasses.replace(resolve_placement(LoadOptions(device="cpu", quantize="none")), packed_float_weights=False)
    model = load_model(checkpoints["custom_voice"], placement).model
    weights = [weakref.ref(m.weight) for m in model.talker.modules() if type(m) is torch.nn.Linear]
    alive_at_each_call = []

    def prepare(weight, bias):
        alive_at_each_call.append(sum(ref() is not None for ref in weights))
        return PackedFloatWeights(weight, bias)

    layers, _, _ = replace_talker_linears(model, prepare)
    assert layers == len(weights) and all(ref() is None for ref in weights)
    # At each call only the layers being replaced (at most q, k and v) may be alive beyond those not reached yet.
    assert alive_at_each_call[-1] <= 3, alive_at_each_call
    assert alive_at_each_call == sorted(alive_at_each_call, reverse=True)
