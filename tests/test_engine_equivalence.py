"""Our frame loop and streaming decoder reproduce the official package exactly.

Greedy decoding must give the very codes of `generate_custom_voice` / `generate_voice_clone`,
and our streamed, concatenated audio must equal the package's decode of them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import MAX_NEW_TOKENS, TEXTS, official_greedy_codes_and_audio, official_seeded_codes

from wyoming_qwen3tts.engine.generate import FrameGenerator
from wyoming_qwen3tts.engine.options import ChunkSchedule, StopRules
from wyoming_qwen3tts.engine.prompt import build_prompt
from wyoming_qwen3tts.engine.runtime import ModelRuntime
from wyoming_qwen3tts.engine.utterance import Utterance, fade_out
from wyoming_qwen3tts.speech import ClonePrompt, PresetSpeaker, SamplingOptions

def our_codes(wrapper, prompt, sampling, frames):
    generator = FrameGenerator(wrapper.model)
    state = generator.prefill(prompt, sampling, frames)
    codes = []
    while (frame := generator.step([state])[0]) is not None:
        codes.append(frame)
    return torch.stack(codes), state.finish_reason


def our_streamed_audio(wrapper, prompt, frames, schedule=ChunkSchedule(first_frames=1, max_frames=4)):
    runtime = ModelRuntime.create(wrapper)
    stop = StopRules(base_frames=frames, frames_per_token=0, max_frames=frames)
    utterance = Utterance(prompt, SamplingOptions().greedy(), stop, schedule)
    chunks, codes = [], []
    while not utterance.finished:
        frames = runtime.advance(utterance)
        if frames is not None:
            codes.append(frames.codes.numpy())
            chunks.append(runtime.decode(utterance, frames))
    assert len(chunks) > 1, "the audio should arrive in several chunks"
    return np.concatenate([c.audio for c in chunks]), np.concatenate(codes), utterance


def expected_audio(official_wav, utterance, fade_samples=1920):
    # A capped utterance ends with our fade-out; the package just stops.
    return fade_out(official_wav, fade_samples) if utterance.finish_reason == "cap" else official_wav


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(("speaker", "language"), [("Ryan", "english"), ("dylan", "auto")])
def test_greedy_preset_voice_codes_and_audio_equal_official(custom_voice_model, text, speaker, language):
    wrapper = custom_voice_model
    official, official_wav = official_greedy_codes_and_audio(
        wrapper,
        wrapper.generate_custom_voice,
        text=text,
        speaker=speaker,
        language=language,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    prompt = build_prompt(wrapper, text, PresetSpeaker(speaker), language, non_streaming_mode=True)
    ours, _reason = our_codes(wrapper, prompt, SamplingOptions().greedy(), MAX_NEW_TOKENS - 1)
    assert ours.shape == official.shape
    assert torch.equal(ours, official)

    audio, streamed_codes, utterance = our_streamed_audio(wrapper, prompt, MAX_NEW_TOKENS - 1)
    assert np.array_equal(streamed_codes, official.numpy())
    expected = expected_audio(official_wav, utterance)
    assert audio.shape == expected.shape
    assert np.abs(audio - expected).max() < 1e-4
    assert np.sqrt(np.mean(audio**2)) > 0.01, "the tiny checkpoint must be audible"


def test_seeded_sampling_draws_the_official_codes(custom_voice_model):
    wrapper = custom_voice_model
    official, prompt = official_seeded_codes(wrapper, TEXTS[1], "Vivian", seed=1234)
    sampling = SamplingOptions.from_generation_config(wrapper.generate_defaults).with_seed(1234)
    assert sampling.do_sample and sampling.top_k == 50 and sampling.repetition_penalty == 1.05
    ours, _reason = our_codes(wrapper, prompt, sampling, MAX_NEW_TOKENS - 1)
    assert torch.equal(ours, official)

    other, _reason = our_codes(wrapper, prompt, sampling.with_seed(99), MAX_NEW_TOKENS - 1)
    assert not torch.equal(other, ours), "a different seed should draw different codes"


@pytest.fixture(scope="module")
def clone_items(base_model, reference_sample):
    audio, sample_rate = reference_sample
    icl = base_model.create_voice_clone_prompt(
        ref_audio=(audio, sample_rate), ref_text="Hello there, this is my voice.", x_vector_only_mode=False
    )[0]
    xvec = base_model.create_voice_clone_prompt(ref_audio=(audio, sample_rate), x_vector_only_mode=True)[0]
    return {"icl": icl, "xvec": xvec}


@pytest.mark.parametrize("mode", ["icl", "xvec"])
@pytest.mark.parametrize("text", [TEXTS[0], TEXTS[2]])
def test_greedy_clone_codes_and_audio_equal_official(base_model, clone_items, mode, text):
    wrapper = base_model
    item = clone_items[mode]
    official, official_wav = official_greedy_codes_and_audio(
        wrapper,
        wrapper.generate_voice_clone,
        text=text,
        language="english",
        voice_clone_prompt=[item],
        max_new_tokens=MAX_NEW_TOKENS,
    )
    voice = ClonePrompt(
        speaker_embedding=item.ref_spk_embedding,
        ref_codes=item.ref_code if mode == "icl" else None,
        ref_text=item.ref_text if mode == "icl" else None,
    )
    assert voice.x_vector_only == (mode == "xvec")
    # The package's voice-clone default is the dual-track text mode.
    prompt = build_prompt(wrapper, text, voice, "english", non_streaming_mode=False)
    ours, _reason = our_codes(wrapper, prompt, SamplingOptions().greedy(), MAX_NEW_TOKENS - 1)
    assert torch.equal(ours, official)

    audio, _codes, utterance = our_streamed_audio(wrapper, prompt, MAX_NEW_TOKENS - 1)
    expected = expected_audio(official_wav, utterance)
    # The package cuts the reference off the decoded audio with a float ratio, which can keep
    # one extra sample; our decoder starts exactly at the first generated frame.
    assert 0 <= len(expected) - len(audio) <= 1
    assert np.abs(audio - expected[len(expected) - len(audio) :]).max() < 1e-4
