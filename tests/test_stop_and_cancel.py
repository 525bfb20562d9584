"""How utterances end: end-of-speech code, frame cap with fade-out, and cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from helpers import drain

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.loader import load_model
from wyoming_qwen3tts.engine.options import MIN_FRAMES, ChunkSchedule, EngineOptions, StopRules
from wyoming_qwen3tts.engine.prompt import build_prompt
from wyoming_qwen3tts.engine.runtime import ModelRuntime
from wyoming_qwen3tts.engine.utterance import Utterance
from wyoming_qwen3tts.speech import JobCancelled, PresetSpeaker, RequestOptions, SamplingOptions

GREEDY = SamplingOptions().greedy()
LONG_TEXT = "Turn off the kitchen lights and set a timer for ten minutes, then tell me the weather."


@pytest.fixture
def fresh_model(checkpoints, cpu_placement):
    """A private copy of the tiny CustomVoice model whose weights a test may bend."""
    return load_model(checkpoints["custom_voice"], cpu_placement)


def bias_eos(wrapper, value: float) -> None:
    """Add ``value`` to the talker's end-of-speech logit: large stops at once, negative never."""
    head = wrapper.model.talker.codec_head
    bias = torch.zeros(head.out_features)
    bias[wrapper.model.config.talker_config.codec_eos_token_id] = value
    head.bias = torch.nn.Parameter(bias)


def run_utterance(wrapper, text, stop, schedule=ChunkSchedule()):
    runtime = ModelRuntime.create(wrapper)
    prompt = build_prompt(wrapper, text, PresetSpeaker("ryan"), "english")
    utterance = Utterance(prompt, GREEDY, stop, schedule)
    chunks, codes = drain(runtime, utterance)
    return utterance, chunks, codes


def test_frame_cap_grows_with_text_and_is_bounded():
    rules = StopRules(base_frames=25, frames_per_token=12, max_frames=300)
    assert rules.frame_cap(1) == 37
    assert rules.frame_cap(10) == 145
    assert rules.frame_cap(10_000) == 300
    assert StopRules(base_frames=0, frames_per_token=0).frame_cap(5) == MIN_FRAMES


def test_end_of_speech_code_ends_the_utterance_without_fade(fresh_model):
    wrapper = fresh_model
    bias_eos(wrapper, 1000.0)  # the package still forbids EOS before the second frame
    utterance, chunks, codes = run_utterance(wrapper, LONG_TEXT, StopRules())
    assert utterance.finish_reason == "eos"
    assert utterance.frames == MIN_FRAMES
    audio = np.concatenate([c.audio for c in chunks])
    assert len(audio) == MIN_FRAMES * 1920
    # The official decode of the same codes, untouched by any fade.
    official, _sr = wrapper.model.speech_tokenizer.decode([{"audio_codes": codes}])
    assert np.abs(audio - official[0]).max() < 1e-4


def test_runaway_generation_ends_at_the_frame_cap_with_a_fade(fresh_model):
    wrapper = fresh_model
    bias_eos(wrapper, -1000.0)
    stop = StopRules(base_frames=9, frames_per_token=0, max_frames=100)
    utterance, chunks, codes = run_utterance(wrapper, "Huh?", stop)
    assert utterance.finish_reason == "cap"
    assert utterance.frames == 9
    audio = np.concatenate([c.audio for c in chunks])
    unfaded, _sr = wrapper.model.speech_tokenizer.decode([{"audio_codes": codes}])
    unfaded = unfaded[0]
    body, tail = slice(0, len(audio) - 1920), slice(len(audio) - 1920, None)
    assert np.abs(audio[body] - unfaded[body]).max() < 1e-4, "only the last frame is faded"
    assert np.abs(unfaded[tail]).max() > 0.05, "the faded frame had sound to fade"
    assert abs(audio[-1]) < 1e-3, "the utterance ends in silence"
    ramp = 0.5 * (1 + np.cos(np.linspace(0, np.pi, 1920)))  # raised cosine from 1 to 0
    assert np.abs(audio[tail] - unfaded[tail] * ramp).max() < 1e-4


@pytest.mark.parametrize("first_frames", [1, 2])
def test_first_chunk_comes_after_at_most_two_frames(custom_voice_model, first_frames):
    runtime = ModelRuntime.create(custom_voice_model)
    prompt = build_prompt(custom_voice_model, LONG_TEXT, PresetSpeaker("ryan"), "english")
    stop = StopRules(base_frames=30, frames_per_token=0, max_frames=30)
    utterance = Utterance(prompt, GREEDY, stop, ChunkSchedule(first_frames=first_frames, max_frames=8))
    chunk = None
    while chunk is None:
        chunk = runtime.advance(utterance)
    assert utterance.frames == first_frames <= 2
    assert chunk.frames == first_frames and chunk.first_frame == 0
    sizes = [chunk.frames]
    while not utterance.finished:
        if (chunk := runtime.advance(utterance)) is not None:
            sizes.append(chunk.frames)
    assert sizes[1] > sizes[0] and max(sizes) == 8, f"later chunks grow: {sizes}"
    assert sum(sizes) == 30


@pytest.fixture
def engine(checkpoints):
    engine = SpeechEngine.load(
        EngineOptions(model=str(checkpoints["custom_voice"]), stop=StopRules(base_frames=60, frames_per_token=0, max_frames=60))
    )
    yield engine
    engine.close()


async def test_cancel_mid_stream_stops_within_one_frame_and_the_next_request_succeeds(engine):
    frames = engine.runtimes["custom_voice"].frames

    job = engine.start(PresetSpeaker("Ryan"), RequestOptions(sampling=GREEDY))
    job.add_text(LONG_TEXT)
    job.finish()
    chunks = job.__aiter__()
    await chunks.__anext__()
    job.cancel()
    at_cancel = frames.frames_generated
    with pytest.raises(JobCancelled):
        async for _chunk in chunks:
            pass
    await asyncio.sleep(0.2)
    assert frames.frames_generated <= at_cancel + 1
    assert at_cancel < 60, "the job was cancelled long before its cap"

    audio = [c async for c in engine.synthesize(["Hello."], PresetSpeaker("Ryan"), RequestOptions(sampling=GREEDY))]
    assert sum(c.frames for c in audio) == 60


async def test_abandoning_the_stream_cancels_the_job(engine):
    stream = engine.synthesize([LONG_TEXT], PresetSpeaker("aiden"), RequestOptions(sampling=GREEDY))
    await stream.__anext__()
    await stream.aclose()
    for _ in range(50):
        if engine.worker.active_jobs == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.worker.active_jobs == 0


async def test_frames_are_generated_while_a_chunk_is_being_decoded(engine, monkeypatch):
    runtime = engine.runtimes["custom_voice"]
    decode = runtime.decoder.decode_batch
    decoding, release = threading.Event(), threading.Event()

    def slow_second_chunk(states, codes):
        # The second: on an idle server the first chunk decodes at once, before the next frame.
        if states[0].frames > 0 and not decoding.is_set():
            decoding.set()
            assert release.wait(10), "the test never released the decoder"
        return decode(states, codes)

    monkeypatch.setattr(runtime.decoder, "decode_batch", slow_second_chunk)
    job = engine.start(PresetSpeaker("Ryan"), RequestOptions(sampling=GREEDY))
    job.add_text(LONG_TEXT)
    job.finish()
    assert await asyncio.to_thread(decoding.wait, 10)
    frames_at_block = runtime.frames.frames_generated
    for _ in range(200):
        if runtime.frames.frames_generated >= frames_at_block + 10:
            break
        await asyncio.sleep(0.02)
    frames_while_blocked = runtime.frames.frames_generated - frames_at_block
    release.set()
    chunks = [chunk async for chunk in job]

    assert frames_while_blocked >= 10, "generation should go on while a chunk decodes"
    assert [c.first_frame for c in chunks] == list(np.cumsum([0] + [c.frames for c in chunks[:-1]]))
    assert sum(c.frames for c in chunks) == 60


async def test_a_failing_decode_fails_only_its_request(engine, monkeypatch, caplog):
    decoder = engine.runtimes["custom_voice"].decoder
    decode = decoder.decode_batch
    calls = []

    def broken_once(states, codes):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("codec exploded")
        return decode(states, codes)

    monkeypatch.setattr(decoder, "decode_batch", broken_once)
    with pytest.raises(RuntimeError, match="codec exploded"):
        async for _chunk in engine.synthesize([LONG_TEXT], PresetSpeaker("Ryan"), RequestOptions(sampling=GREEDY)):
            pass
    assert "Decoding audio for job" in caplog.text

    audio = [c async for c in engine.synthesize(["Hello."], PresetSpeaker("Ryan"), RequestOptions(sampling=GREEDY))]
    assert sum(c.frames for c in audio) == 60
    for _ in range(50):
        if engine.worker.active_jobs == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.worker.active_jobs == 0


async def test_a_chunk_that_fails_to_decode_after_the_last_step_fails_the_request(engine, monkeypatch):
    runtime = engine.runtimes["custom_voice"]
    decode = runtime.decoder.decode_batch
    generated_all = threading.Event()

    def last_chunk_breaks(states, codes):
        if states[0].frames + codes[0].shape[0] >= 60:
            # The model has made every frame and the job has ended before this chunk decodes.
            assert generated_all.wait(120), "the job never finished generating"
            raise RuntimeError("codec exploded on the last chunk")
        return decode(states, codes)

    monkeypatch.setattr(runtime.decoder, "decode_batch", last_chunk_breaks)
    job = engine.start(PresetSpeaker("Ryan"), RequestOptions(sampling=GREEDY))
    job.add_text(LONG_TEXT)
    job.finish()
    # 60 frames: a second or two, but a busy 2-core VM once took over 10 s.
    deadline = time.monotonic() + 120
    while not job.done and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert job.done, "every frame made"
    generated_all.set()
    with pytest.raises(RuntimeError, match="codec exploded on the last chunk"):
        async for _chunk in job:
            pass
