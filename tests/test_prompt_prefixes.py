"""A voice's prompt beginning is computed once; later prompts start from its kept history.

The kept history must change nothing: the state after a prefill, and every code after it, equal
bit for bit what a generator that keeps nothing computes, in float32 and in int8 (whose activation
rounding turns the smallest difference into other codes), for both text modes, and for the
padded talker histories a GPU uses.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from wyoming_qwen3tts.engine.generate import FrameGenerator
from wyoming_qwen3tts.engine.kv_cache import attention
from wyoming_qwen3tts.engine.loader import LoadOptions, load_model, resolve_placement
from wyoming_qwen3tts.engine.prompt import DualTrackPrompt, build_prompt
from wyoming_qwen3tts.engine.prompt_prefixes import PromptPrefixCache
from wyoming_qwen3tts.speech import ClonePrompt, PresetSpeaker, SamplingOptions

GREEDY = SamplingOptions().greedy()
TEXTS = (
    "It is twenty one degrees inside.",
    "The front door is locked and the garage is closed.",
    "Okay.",
)
FRAMES = 12


@pytest.fixture(scope="module")
def int8_model(checkpoints):
    return load_model(checkpoints["custom_voice"], resolve_placement(LoadOptions(device="cpu", quantize="int8")))


def run(generator: FrameGenerator, prompt, sampling=GREEDY):
    """The state right after the prefill (its history, the chosen first code) and the codes after it."""
    state = generator.prefill(prompt, sampling, FRAMES)
    cache = state.talker_cache
    after_prefill = (*cache.history(cache.length), state.last_hidden.clone(), state.next_code0.clone())
    codes = torch.stack([frame for frame in iter(lambda: generator.step([state])[0], None)])
    return after_prefill, codes


def assert_same_run(ours, expected):
    for got, want in zip(ours[0], expected[0]):
        assert torch.equal(got, want)
    assert torch.equal(ours[1], expected[1])


@pytest.mark.parametrize("weights", ["float32", "int8"])
@pytest.mark.parametrize("non_streaming_mode", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_a_voices_beginning_is_computed_once_and_later_prompts_give_the_same_codes(
    custom_voice_model, int8_model, weights, non_streaming_mode, padded
):
    wrapper = custom_voice_model if weights == "float32" else int8_model
    keeping = FrameGenerator(wrapper.model, padded_attention=padded)
    for index, text in enumerate(TEXTS):
        prompt = build_prompt(wrapper, text, PresetSpeaker("ryan"), "english", non_streaming_mode=non_streaming_mode)
        assert 0 < prompt.shared < prompt.prefill.shape[1]
        ours = run(keeping, prompt)
        assert (keeping.prefixes.hits, keeping.prefixes.misses) == (index, 1)
        expected = run(FrameGenerator(wrapper.model, padded_attention=padded, prefix_budget_bytes=0), prompt)
        assert_same_run(ours, expected)
        if weights == "float32":  # the two passes compute what one pass over the prompt computes
            one_pass = run(FrameGenerator(wrapper.model, padded_attention=padded), dataclasses.replace(prompt, shared=0))
            for got, want in zip(ours[0][:3], one_pass[0][:3]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(keeping.prefixes) == 1


def test_a_seeded_request_draws_the_same_codes_with_or_without_a_kept_beginning(custom_voice_model):
    wrapper = custom_voice_model
    sampling = SamplingOptions().with_seed(11)
    keeping = FrameGenerator(wrapper.model)
    run(keeping, build_prompt(wrapper, TEXTS[0], PresetSpeaker("ryan"), "english"), sampling)
    prompt = build_prompt(wrapper, TEXTS[1], PresetSpeaker("ryan"), "english")
    ours = run(keeping, prompt, sampling)
    assert keeping.prefixes.hits == 1
    assert_same_run(ours, run(FrameGenerator(wrapper.model, prefix_budget_bytes=0), prompt, sampling))


def test_a_streamed_reply_starts_from_the_beginning_a_whole_sentence_kept(custom_voice_model):
    wrapper = custom_voice_model
    keeping = FrameGenerator(wrapper.model)
    run(keeping, build_prompt(wrapper, TEXTS[0], PresetSpeaker("ryan"), "english"))
    streamed = DualTrackPrompt(wrapper, PresetSpeaker("ryan"), "english", None)
    streamed.add_tokens(wrapper.processor.tokenizer("Hello", add_special_tokens=False)["input_ids"])
    streamed.finish()
    ours = run(keeping, streamed.prompt)
    assert keeping.prefixes.hits == 1
    # Its prefill is the beginning and one token: only that token is computed.
    assert streamed.prompt.prefill.shape[1] == streamed.prompt.shared + 1
    assert_same_run(ours, run(FrameGenerator(wrapper.model, prefix_budget_bytes=0), streamed.prompt))


def test_other_speakers_and_languages_keep_beginnings_of_their_own(custom_voice_model):
    wrapper = custom_voice_model
    keeping = FrameGenerator(wrapper.model)
    for speaker, language in [("ryan", "english"), ("serena", "english"), ("ryan", "chinese"), ("ryan", "english")]:
        run(keeping, build_prompt(wrapper, TEXTS[0], PresetSpeaker(speaker), language))
    assert (keeping.prefixes.hits, keeping.prefixes.misses, len(keeping.prefixes)) == (1, 3, 3)


def test_an_in_context_clone_keeps_its_sample_transcript_as_part_of_its_beginning(base_model, reference_sample):
    wrapper = base_model
    audio, sample_rate = reference_sample
    item = wrapper.create_voice_clone_prompt(
        ref_audio=(audio, sample_rate), ref_text="Hello there, this is my voice.", x_vector_only_mode=False
    )[0]
    voice = ClonePrompt(speaker_embedding=item.ref_spk_embedding, ref_codes=item.ref_code, ref_text=item.ref_text)
    first, second = (build_prompt(wrapper, text, voice, "english", non_streaming_mode=False) for text in TEXTS[:2])
    transcript = len(wrapper.processor.tokenizer("Hello there, this is my voice.", add_special_tokens=False)["input_ids"])
    assert first.shared == second.shared > transcript
    shared = first.shared
    assert torch.equal(first.prefill[:, :shared], second.prefill[:, :shared])
    assert not torch.equal(first.prefill[:, shared], second.prefill[:, shared]), "the text begins right after"
    keeping = FrameGenerator(wrapper.model)
    run(keeping, first)
    ours = run(keeping, second)
    assert keeping.prefixes.hits == 1
    assert_same_run(ours, run(FrameGenerator(wrapper.model, prefix_budget_bytes=0), second))
    # With the whole text up front the transcript comes first too (beside other codec inputs).
    whole = [build_prompt(wrapper, text, voice, "english", non_streaming_mode=True) for text in TEXTS[1:]]
    assert whole[0].shared == whole[1].shared == shared
    assert torch.equal(whole[0].prefill[:, :shared], whole[1].prefill[:, :shared])


def test_new_positions_after_a_history_attend_to_all_of_it_and_causally_among_themselves():
    torch.manual_seed(0)
    history, new = 5, 3
    q = torch.randn(1, 4, history + new, 8)
    keys, values = torch.randn(1, 2, history + new, 8), torch.randn(1, 2, history + new, 8)
    whole = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=0.3, enable_gqa=True)
    continued = attention(q[:, :, history:], keys, values, 0.3)
    torch.testing.assert_close(continued, whole[:, :, history:])


def test_beginnings_beyond_the_memory_budget_drop_the_least_recently_used():
    def entry(value: float):
        embeds = torch.full((1, 2, 4), value)
        return embeds, torch.full((1, 1, 1, 2, 4), value), torch.full((1, 1, 1, 2, 4), value)

    size = sum(t.numel() * t.element_size() for t in entry(0.0))
    cache = PromptPrefixCache(budget_bytes=2 * size)
    cache.keep(*entry(1.0))
    cache.keep(*entry(2.0))
    assert cache.find(entry(1.0)[0]) is not None  # 1 is now the most recently used
    cache.keep(*entry(3.0))
    assert len(cache) == 2 and cache.nbytes <= 2 * size
    assert cache.find(entry(2.0)[0]) is None
    assert torch.equal(cache.find(entry(1.0)[0]).keys, entry(1.0)[1])
    assert cache.find(entry(3.0)[0]) is not None
    assert cache.find(torch.full((1, 2, 4), 1.0 + 1e-6)) is None, "a beginning that differs at all is another"
    nothing = PromptPrefixCache(budget_bytes=0)
    nothing.keep(*entry(1.0))
    assert nothing.find(entry(1.0)[0]) is None and len(nothing) == 0
