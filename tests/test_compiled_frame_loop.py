"""The plain-tensor layers equal the package's modules, and the compiled frame loop picks the stock codes.

Compiling takes a minute on a 2-core machine, so one compiled generator serves the whole module.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from helpers import MAX_NEW_TOKENS, TEXTS, generate_rows, official_greedy_codes_and_audio, official_seeded_codes

from wyoming_qwen3tts.engine import predictor as predictor_module
from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.generate import FrameGenerator
from wyoming_qwen3tts.engine.kv_cache import StaticKVCache
from wyoming_qwen3tts.engine.layers import DecoderStack, signed_sin
from wyoming_qwen3tts.engine.loader import LoadOptions
from wyoming_qwen3tts.engine.options import EngineOptions
from wyoming_qwen3tts.engine.prompt import PresetSpeaker, build_prompt
from wyoming_qwen3tts.speech import SamplingOptions

FRAMES = MAX_NEW_TOKENS - 1


def generate(generator: FrameGenerator, prompt, sampling: SamplingOptions, frames: int = FRAMES) -> torch.Tensor:
    state = generator.prefill(prompt, sampling, frames)
    codes = []
    while (frame := generator.step([state])[0]) is not None:
        codes.append(frame)
    return torch.stack(codes)


@pytest.fixture(scope="module")
def default_sampling(custom_voice_model) -> SamplingOptions:
    return SamplingOptions.from_generation_config(custom_voice_model.generate_defaults)


@pytest.fixture(scope="module")
def compiled_generator(custom_voice_model, default_sampling) -> FrameGenerator:
    generator = FrameGenerator(custom_voice_model.model, compile=True)
    generator.warm_up(default_sampling)
    assert generator.predictor.compile, "compiling the tiny checkpoint's loop should work on this machine"
    return generator


def test_plain_layers_equal_the_package_layers_bit_for_bit(custom_voice_model):
    predictor = custom_voice_model.model.talker.code_predictor
    stack = DecoderStack.of(predictor.model, predictor.config)
    config = predictor.config
    torch.manual_seed(0)
    hidden = torch.randn(1, 3, config.hidden_size)
    positions = torch.arange(3).unsqueeze(0)
    cos, sin = predictor.model.rotary_emb(hidden, positions)
    signed = signed_sin(sin)

    def cache():
        return StaticKVCache(config.num_hidden_layers, config.num_key_value_heads, stack.head_dim, 8, hidden.dtype, "cpu")

    with torch.inference_mode():
        ours_cache = cache()
        ours = stack.forward(hidden[:, :2], cos[:, None, :2], signed[:, None, :2], ours_cache)
        ours_next = stack.forward(hidden[:, 2:], cos[:, None, 2:], signed[:, None, 2:], ours_cache)

        theirs_cache = cache()
        outputs = []
        for window in (slice(0, 2), slice(2, 3)):
            states = hidden[:, window]
            for layer in predictor.model.layers:
                states = layer(
                    states,
                    attention_mask=None,
                    past_key_values=theirs_cache,
                    use_cache=True,
                    position_embeddings=(cos[:, window], sin[:, window]),
                )[0]
            theirs_cache.advance(states.shape[1])
            outputs.append(predictor.model.norm(states))

    assert torch.equal(ours, outputs[0])
    assert torch.equal(ours_next, outputs[1])
    # The positions written (the rest of a cache is uninitialised memory), and the values too.
    assert ours_cache.length == theirs_cache.length == 3
    for ours_kept, theirs_kept in ((ours_cache.keys, theirs_cache.keys), (ours_cache.values, theirs_cache.values)):
        assert torch.equal(ours_kept[:, :, :, :3], theirs_kept[:, :, :, :3])


def test_compiled_loop_picks_the_eager_loop_s_codes_from_the_same_draws(
    custom_voice_model, compiled_generator, default_sampling, seeds_draw_for_the_top_k
):
    prompt = build_prompt(custom_voice_model, TEXTS[1], PresetSpeaker("Serena"), "english", non_streaming_mode=True)
    expected = generate(FrameGenerator(custom_voice_model.model), prompt, default_sampling.with_seed(77))

    compiled_before = compiled_generator.predictor.compiled_frames
    ours = generate(compiled_generator, prompt, default_sampling.with_seed(77))
    compiled = compiled_generator.predictor.compiled_frames - compiled_before
    assert compiled == len(ours), "every frame's codebooks 1-15 should come from the compiled loop"
    assert torch.equal(ours, expected)


def test_a_seeded_request_runs_eagerly_beside_the_compiled_loop_and_draws_the_official_codes(
    custom_voice_model, compiled_generator, default_sampling
):
    official, prompt = official_seeded_codes(custom_voice_model, TEXTS[1], "Serena", seed=77)

    compiled_before = compiled_generator.predictor.compiled_frames
    ours = generate(compiled_generator, prompt, default_sampling.with_seed(77))
    assert compiled_generator.predictor.compiled_frames == compiled_before, "its draws have another shape"
    assert torch.equal(ours, official)


def test_other_sampling_settings_run_uncompiled_without_compiling_again(
    custom_voice_model, compiled_generator, monkeypatch
):
    wrapper = custom_voice_model
    text = TEXTS[0]
    official, _wav = official_greedy_codes_and_audio(
        wrapper,
        wrapper.generate_custom_voice,
        text=text,
        speaker="Ryan",
        language="english",
        max_new_tokens=MAX_NEW_TOKENS,
    )

    def no_compiling(*args, **kwargs):
        raise AssertionError("a request must never wait for a compile")

    monkeypatch.setattr(predictor_module.torch, "compile", no_compiling)
    prompt = build_prompt(wrapper, text, PresetSpeaker("Ryan"), "english", non_streaming_mode=True)
    ours = generate(compiled_generator, prompt, SamplingOptions().greedy())
    assert torch.equal(ours, official)


def test_a_failing_compile_falls_back_to_the_same_codes_with_a_warning(
    custom_voice_model, default_sampling, monkeypatch, caplog
):
    wrapper = custom_voice_model
    prompt = build_prompt(wrapper, TEXTS[2], PresetSpeaker("Aiden"), "english", non_streaming_mode=True)
    expected = generate(FrameGenerator(wrapper.model), prompt, default_sampling.with_seed(5))

    def broken_compile(function, **kwargs):
        def run(*args):
            raise RuntimeError("backend exploded\nlong traceback")

        return run

    monkeypatch.setattr(predictor_module.torch, "compile", broken_compile)
    generator = FrameGenerator(wrapper.model, compile=True)
    with caplog.at_level(logging.WARNING, logger=predictor_module.__name__):
        generator.warm_up(default_sampling)
        ours = generate(generator, prompt, default_sampling.with_seed(5))

    assert torch.equal(ours, expected)
    assert not generator.predictor.compile
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "RuntimeError: backend exploded" in warnings[0] and "leave out --compile" in warnings[0]


def test_a_compiled_batch_gives_the_uncompiled_batch_s_codes(
    custom_voice_model, compiled_generator, default_sampling, seeds_draw_for_the_top_k
):
    """One compiled graph serves batches of any size from two rows up; each row keeps its own draws."""
    wrapper = custom_voice_model
    speakers = ["Ryan", "Vivian", "Aiden"]
    prompts = [build_prompt(wrapper, TEXTS[i], PresetSpeaker(speakers[i]), "english", non_streaming_mode=True) for i in range(3)]
    samplings = [default_sampling.with_seed(30 + i) for i in range(3)]

    def batch(generator):
        return generate_rows(generator, prompts, samplings, FRAMES)

    compiled_before = compiled_generator.predictor.compiled_frames
    ours = batch(compiled_generator)
    assert compiled_generator.predictor.compiled_frames - compiled_before == 3 * FRAMES, "every row of every step compiled"
    for compiled, eager in zip(ours, batch(FrameGenerator(wrapper.model))):
        assert torch.equal(compiled, eager)


def test_an_engine_compiles_on_the_thread_that_steps_the_model(checkpoints, monkeypatch):
    """CUDA graphs belong to the thread that records them: recorded while loading, on another
    thread, they would be recorded again by the first requests."""
    warmed_up_on = []

    def warm_up(self, sampling, max_rows=2):
        warmed_up_on.append((threading.current_thread().name, max_rows))

    monkeypatch.setattr(FrameGenerator, "warm_up", warm_up)  # records where, compiles nothing
    options = EngineOptions(model=str(checkpoints["custom_voice"]), load=LoadOptions(device="cpu", compile=True), max_batch=4)
    engine = SpeechEngine.load(options)
    try:
        model_thread = engine.worker.submit(lambda: threading.current_thread().name).result()
        assert warmed_up_on == [(model_thread, 4)]
        assert model_thread != threading.current_thread().name
    finally:
        engine.close()
