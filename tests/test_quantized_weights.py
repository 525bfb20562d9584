"""8-bit and 4-bit weights: close to the float layers, deterministic, and spoken through Wyoming."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from helpers import greedy_cycle_through_wyoming, is_one_audio_cycle, loudest_sample

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.generate import FrameGenerator
from wyoming_qwen3tts.engine.loader import load_model, parameter_bytes, resolve_placement
from wyoming_qwen3tts.engine.options import EngineOptions, LoadOptions, StopRules
from wyoming_qwen3tts.engine.predictor import PredictorSampling
from wyoming_qwen3tts.engine.prompt import build_prompt
from wyoming_qwen3tts.engine import int4_weights
from wyoming_qwen3tts.engine.quantize import kernel_for, resolve_mode
from wyoming_qwen3tts.engine.int4_weights import Int4Weights, KleidiAIInt4Weights
from wyoming_qwen3tts.engine.quantized_linear import Int8Weights, PreparedLinear, kernel_fault, snr_db
from wyoming_qwen3tts.engine.sampling import ExponentialNoise
from wyoming_qwen3tts.speech import PresetSpeaker, SamplingOptions

# What a wrong scale or packing gives is about 0 dB.
MIN_SNR_DB = {"int8": 30.0, "int4": 15.0}


@pytest.fixture(scope="module")
def layer_inputs(custom_voice_model):
    """Each float linear layer of the tiny talker with the inputs it got in a stock generation."""
    recorded, handles = {}, []
    for name, module in custom_voice_model.model.talker.named_modules():
        if type(module) is torch.nn.Linear:
            recorded[name] = (module, [])
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: recorded[name][1].append(args[0].reshape(-1, args[0].shape[-1]).clone())))
    try:
        custom_voice_model.generate_custom_voice("Turn off the lights.", speaker="ryan", language="english", max_new_tokens=4)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (module, torch.cat(inputs)) for name, (module, inputs) in recorded.items() if inputs}


# KleidiAI's kernel runs here as PyTorch's reference code for its operator (the same packed
# input), which proves our packing; its own arithmetic is checked on aarch64 (script/arm64-check).
@pytest.mark.parametrize("kernel", [Int8Weights, Int4Weights, KleidiAIInt4Weights], ids=["int8", "int4", "int4-kleidiai"])
def test_every_quantized_layer_is_close_to_its_float_layer(layer_inputs, kernel):
    checked = 0
    with torch.inference_mode():
        for name, (module, x) in layer_inputs.items():
            try:
                weights = kernel(module.weight, module.bias)
            except ValueError:  # int4 groups that do not divide a tiny layer
                continue
            for rows in (x[:1], x):  # one row (a frame step) and several (a prompt)
                snr = snr_db(F.linear(rows, module.weight, module.bias), weights(rows))
                assert snr >= MIN_SNR_DB[f"int{kernel.bits}"], f"{name}: {snr:.1f} dB on {rows.shape[0]} rows"
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kernel", [Int8Weights, Int4Weights, KleidiAIInt4Weights], ids=["int8", "int4", "int4-kleidiai"])
def test_a_quantized_layer_takes_a_strided_batch_of_any_float_type(kernel, dtype):
    """The last position of each row of a batch is a strided view; in bfloat16 nothing on the way
    copies it (PyTorch's int4 kernel refused it: every batched bfloat16 step with int4 failed)."""
    generator = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(96, 128, generator=generator) * 0.05, torch.randn(96, generator=generator)
    weights = kernel(weight, bias)
    hidden = torch.randn(4, 3, 128, generator=generator).to(dtype)
    last = hidden[:, -1]
    assert not last.is_contiguous()
    out = weights(last)
    assert out.dtype == dtype and torch.equal(out, weights(last.contiguous()))


def test_a_wrong_scale_is_caught_by_the_snr_bound(layer_inputs):
    module, x = next(iter(layer_inputs.values()))
    weights = Int8Weights(module.weight * 3, module.bias)  # as if the scales were off
    assert snr_db(F.linear(x, module.weight, module.bias), weights(x)) < 10


def test_an_int8_row_of_zeros_gives_its_bias_and_a_row_keeps_its_result_beside_louder_rows():
    torch.manual_seed(3)
    weight, bias = torch.randn(48, 64) * 0.05, torch.randn(48)
    weights = Int8Weights(weight, bias)
    quiet, loud = torch.randn(1, 64) * 1e-3, torch.randn(1, 64) * 1e3
    out = weights(torch.cat((torch.zeros(1, 64), quiet, loud)))
    assert torch.equal(out[0], bias), "a zero row must not turn into NaN or noise"
    # Each row is scaled by its own magnitude: a quiet row beside a loud one loses nothing.
    assert torch.equal(out[1:2], weights(quiet))
    assert snr_db(F.linear(quiet, weight, bias) - bias, out[1:2] - bias) >= MIN_SNR_DB["int8"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_loading_quantizes_every_talker_and_predictor_linear_and_greedy_runs_repeat(checkpoints, custom_voice_model, mode):
    wrapper = load_model(checkpoints["custom_voice"], resolve_placement(LoadOptions(device="cpu", quantize=mode)))
    talker = wrapper.model.talker
    assert not [name for name, m in talker.named_modules() if type(m) is torch.nn.Linear]
    linears = sum(1 for m in custom_voice_model.model.talker.modules() if type(m) is torch.nn.Linear)
    assert sum(1 for m in talker.modules() if isinstance(m, PreparedLinear)) == linears
    assert isinstance(talker.codec_head, PreparedLinear) and all(isinstance(h, PreparedLinear) for h in talker.code_predictor.lm_head)
    codec = wrapper.model.speech_tokenizer.model
    assert not any(isinstance(m, PreparedLinear) for m in codec.modules()), "the codec stays as it is"
    assert any(type(m) is torch.nn.Embedding for m in talker.modules()), "embeddings stay as they are"
    prompt = build_prompt(wrapper, "It is twenty one degrees inside.", PresetSpeaker("ryan"), "english", non_streaming_mode=True)

    def greedy_codes():
        generator = FrameGenerator(wrapper.model)
        state = generator.prefill(prompt, SamplingOptions().greedy(), 20)
        return torch.stack([frame for frame in iter(lambda: generator.step([state])[0], None)])

    first, second = greedy_codes(), greedy_codes()
    assert first.shape == (20, 16) and torch.equal(first, second)


def test_quantized_weights_take_less_memory(checkpoints):
    sizes = {
        mode: parameter_bytes(load_model(checkpoints["custom_voice"], resolve_placement(LoadOptions(device="cpu", quantize=mode))).model.talker)
        for mode in ("none", "int8", "int4")
    }
    assert sizes["int4"] < sizes["int8"] < sizes["none"]


def test_auto_is_int8_on_a_cpu_and_a_missing_kernel_falls_back_with_one_line(monkeypatch, caplog):
    assert resolve_mode("auto", torch.device("cpu")) == "int8"
    assert resolve_mode("auto", torch.device("cuda")) == "none"

    def no_kernel(*args, **kwargs):
        raise RuntimeError("not built for this CPU")

    monkeypatch.setattr(torch, "_convert_weight_to_int4pack_for_cpu", no_kernel)
    with caplog.at_level(logging.WARNING):
        assert resolve_mode("int4", torch.device("cpu")) == "int8"
    assert "No usable int4 kernel on this machine" in caplog.text


def offer_kleidiai(monkeypatch, dot_product: bool = True) -> None:
    """Make this machine look like an aarch64 PyTorch build (KleidiAI built in), on a CPU with or
    without the dot product; the operator then runs PyTorch's reference code for it."""
    monkeypatch.setattr(int4_weights, "kleidiai_built", lambda: True)
    monkeypatch.setattr(int4_weights, "arm_dot_product", lambda: dot_product)


def test_int4_takes_kleidiai_where_pytorch_has_it_and_the_cpu_can_run_it(checkpoints, monkeypatch, caplog):
    assert kernel_for("int4") is (KleidiAIInt4Weights if int4_weights.kleidiai_built() else Int4Weights)
    offer_kleidiai(monkeypatch)
    with caplog.at_level(logging.WARNING):
        assert resolve_mode("int4", torch.device("cpu")) == "int4"
    assert not caplog.text
    assert kernel_for("int4") is KleidiAIInt4Weights
    wrapper = load_model(checkpoints["custom_voice"], resolve_placement(LoadOptions(device="cpu", quantize="int4")))
    kinds = {type(getattr(m.weights, "fused", m.weights)) for m in wrapper.model.talker.modules() if isinstance(m, PreparedLinear)}
    assert KleidiAIInt4Weights in kinds and Int4Weights not in kinds  # tiny layers the groups do not divide: int8


def test_an_arm_cpu_without_the_dot_product_keeps_pytorchs_int4_kernel_and_the_log_says_why(monkeypatch, caplog):
    # A Raspberry Pi 4's Cortex-A72: KleidiAI's one-row kernel would die on an unknown instruction.
    offer_kleidiai(monkeypatch, dot_product=False)
    monkeypatch.setattr(KleidiAIInt4Weights, "__call__", lambda self, x: pytest.fail("KleidiAI's kernel was called"))
    with caplog.at_level(logging.WARNING):
        assert resolve_mode("int4", torch.device("cpu")) == "int4"
    assert kernel_for("int4") is Int4Weights
    assert "int4 does not use KleidiAI" in caplog.text and "dot product" in caplog.text


def test_a_kleidiai_kernel_with_wrong_products_gives_way_to_pytorchs_int4_kernel(monkeypatch, caplog):
    offer_kleidiai(monkeypatch)
    call = KleidiAIInt4Weights.__call__
    monkeypatch.setattr(KleidiAIInt4Weights, "__call__", lambda self, x: call(self, x) * 0.5)
    with caplog.at_level(logging.WARNING):
        assert resolve_mode("int4", torch.device("cpu")) == "int4"
    assert kernel_for("int4") is Int4Weights
    assert "int4 does not use KleidiAI" in caplog.text and "dB from the float product" in caplog.text


@pytest.fixture
def quantized_engine():
    """PyTorch's quantized engine (process-wide), restored after the test."""
    default = torch.backends.quantized.engine
    yield default
    torch.backends.quantized.engine = default


def corrupt_single_rows_on(monkeypatch, broken_engines: set[str]) -> None:
    """Make the int8 product of one row wrong under ``broken_engines``, as oneDNN's was on an
    aarch64 build of PyTorch: a kernel that runs, and returns the wrong numbers."""
    product = Int8Weights.product

    def faulty(self, spread):
        out = product(self, spread)
        return out.flip(-1) if torch.backends.quantized.engine in broken_engines and spread.shape[0] == 1 else out

    monkeypatch.setattr(Int8Weights, "product", faulty)


def test_an_int8_engine_with_wrong_products_is_replaced_by_one_with_right_products(monkeypatch, caplog, quantized_engine):
    corrupt_single_rows_on(monkeypatch, {quantized_engine})
    assert "one row alone" in kernel_fault(Int8Weights)
    with caplog.at_level(logging.WARNING):
        assert resolve_mode("auto", torch.device("cpu")) == "int8"
    assert torch.backends.quantized.engine != quantized_engine
    assert f"quantized engine {quantized_engine!r} is not usable here" in caplog.text
    generator = torch.Generator().manual_seed(0)  # fixed numbers: a random draw's SNR varies by a few dB
    weight, rows = torch.randn(64, 128, generator=generator), torch.randn(1, 128, generator=generator)
    assert snr_db(F.linear(rows, weight), Int8Weights(weight, None)(rows)) >= MIN_SNR_DB["int8"]


def test_when_no_int8_engine_gives_right_products_the_weights_stay_float(monkeypatch, caplog, quantized_engine):
    corrupt_single_rows_on(monkeypatch, set(torch.backends.quantized.supported_engines))
    with caplog.at_level(logging.WARNING):
        assert resolve_mode("int8", torch.device("cpu")) == "none"
    assert torch.backends.quantized.engine == quantized_engine, "the default engine is put back"
    assert "No usable int8 kernel" in caplog.text and "one row alone" in caplog.text


def test_an_int4_kernel_with_wrong_products_falls_back_to_int8(monkeypatch, caplog):
    call = Int4Weights.__call__
    monkeypatch.setattr(Int4Weights, "__call__", lambda self, x: call(self, x) * 0.5)
    with caplog.at_level(logging.WARNING):
        assert resolve_mode("int4", torch.device("cpu")) == "int8"
    assert "No usable int4 kernel" in caplog.text and "dB from the float product" in caplog.text


@pytest.mark.skipif("qnnpack" not in torch.backends.quantized.supported_engines, reason="no QNNPACK in this PyTorch")
def test_int8_on_the_qnnpack_engine_is_close_to_float_and_a_row_keeps_its_result_in_a_batch(layer_inputs, quantized_engine):
    # QNNPACK is what an aarch64 machine falls back to; it quantizes the activations itself.
    torch.backends.quantized.engine = "qnnpack"
    assert kernel_fault(Int8Weights) is None
    with torch.inference_mode():
        for name, (module, inputs) in layer_inputs.items():
            layer = Int8Weights(module.weight, module.bias)
            rows = inputs[:8]
            batch = layer(rows)
            assert snr_db(module(rows), batch) >= MIN_SNR_DB["int8"], name
            assert torch.equal(torch.cat([layer(row) for row in rows.split(1)]), batch), name


@pytest.mark.parametrize("mode", ["int8", "int4"])
async def test_a_quantized_engine_streams_speech_through_wyoming(checkpoints, tmp_path, mode):
    engine = SpeechEngine.load(
        EngineOptions(
            model=str(checkpoints["custom_voice"]),
            load=LoadOptions(device="cpu", quantize=mode),
            stop=StopRules(base_frames=8, frames_per_token=0, max_frames=8),
            data_dir=tmp_path,
        )
    )
    cycle = await greedy_cycle_through_wyoming(engine)
    assert is_one_audio_cycle(cycle.types) and len(cycle.audio) == 8 * 1920 * 2
    assert loudest_sample(cycle.audio) > 100


def test_a_compiled_int8_code_predictor_runs_the_int8_kernel_and_draws_the_uncompiled_codes(
    checkpoints, caplog, monkeypatch, seeds_draw_for_the_top_k
):
    # Dynamo must trace the whole loop (fullgraph) through the int8 operator and its fake; the
    # backend here is aot_eager, since inductor's C++ build of a 15-step graph takes minutes on
    # 2 cores. `benchmarks/quantize_speed.py --modes int8-compiled` runs the inductor build.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, fullgraph=False, **_: real_compile(fn, fullgraph=fullgraph, backend="aot_eager"))
    wrapper = load_model(checkpoints["custom_voice"], resolve_placement(LoadOptions(device="cpu", quantize="int8")))
    sampling = SamplingOptions.from_generation_config(wrapper.generate_defaults)
    prompt = build_prompt(wrapper, "Good night.", PresetSpeaker("aiden"), "english", non_streaming_mode=True)

    def seeded_codes(generator):
        state = generator.prefill(prompt, sampling.with_seed(11), 12)
        return torch.stack([frame for frame in iter(lambda: generator.step([state])[0], None)])

    with caplog.at_level(logging.INFO):
        compiled = FrameGenerator(wrapper.model, compile=True)
        compiled.warm_up(sampling, max_rows=1)
    assert compiled.predictor.compile, "the int8 code predictor should compile on this machine"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    ours = seeded_codes(compiled)
    assert compiled.predictor.compiled_frames == ours.shape[0], "every frame's codebooks 1-15 from the compiled loop"
    assert torch.equal(ours, seeded_codes(FrameGenerator(wrapper.model)))

    # The compiled graph calls fbgemm's product for every layer of every step (none is traced away).
    monkeypatch.undo()
    products = []
    real_product = Int8Weights.product
    monkeypatch.setattr(Int8Weights, "product", lambda self, spread: products.append(spread.shape) or real_product(self, spread))
    predictor = wrapper.model.talker.code_predictor
    hidden = torch.randn(1, 1, wrapper.model.talker.config.hidden_size)
    with torch.inference_mode():
        compiled.predictor.codes(hidden, torch.tensor([3]), [PredictorSampling.of(sampling.greedy())], [None])
    # greedy is not the compiled sampling: that call ran eagerly; the default sampling's runs compiled
    eager_calls, products[:] = len(products), []
    noise = ExponentialNoise(torch.Generator().manual_seed(5), stock_stream=False)
    with torch.inference_mode():
        compiled.predictor.codes(hidden, torch.tensor([3]), [PredictorSampling.of(sampling)], [noise])
    assert compiled.predictor.compiled_frames == ours.shape[0] + 1
    per_step = 4 * len(predictor.model.layers) + 1 + (0 if isinstance(predictor.small_to_mtp_projection, torch.nn.Identity) else 1)
    assert len(products) == eager_calls == len(predictor.lm_head) * per_step
    monkeypatch.undo()
