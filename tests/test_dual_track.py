"""Dual-track streaming: speech starts while the text is still arriving."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch
from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from helpers import CodeRecorder, ServerThread, advance, official_greedy_codes_and_audio, read_until

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.options import ChunkSchedule, EngineOptions, StopRules
from wyoming_qwen3tts.engine.prompt import DualTrackPrompt
from wyoming_qwen3tts.engine.text_feed import IncrementalTokenizer, TextFeed
from wyoming_qwen3tts.engine.runtime import ModelRuntime
from wyoming_qwen3tts.engine.utterance import Utterance
from wyoming_qwen3tts.request import RequestLayerOptions
from wyoming_qwen3tts.settings import Settings
from wyoming_qwen3tts.speech import ClonePrompt, PresetSpeaker, RequestOptions, SamplingOptions

GREEDY = SamplingOptions().greedy()
TEXT = "Turn off the kitchen lights, please. It's getting late (almost 11 pm) and I'm tired!"
FRAMES = 23


def run_dual_track(wrapper, voice, pieces: list[str], advances_between: int = 3, seed: int = 0):
    """Feed ``pieces`` into a dual-track utterance, advancing it in between; return all codes."""
    runtime = ModelRuntime.create(wrapper)
    feed = TextFeed()
    stop = StopRules(base_frames=FRAMES, frames_per_token=0, max_frames=FRAMES)
    prompt = DualTrackPrompt(wrapper, voice, "english", None)
    utterance = Utterance(prompt, GREEDY, stop, ChunkSchedule(first_frames=1, max_frames=4), feed=feed)
    rng = random.Random(seed)
    codes, first_audio_after = [], None
    for index, piece in enumerate(pieces):
        feed.append(piece)
        for _ in range(rng.randint(0, advances_between)):
            chunk, frames = advance(runtime, utterance)
            if chunk is not None:
                codes.append(frames)
                first_audio_after = index if first_audio_after is None else first_audio_after
    feed.finish()
    while not utterance.finished:
        chunk, frames = advance(runtime, utterance)
        if chunk is not None:
            codes.append(frames)
    return torch.cat(codes), utterance, first_audio_after


def test_incremental_tokens_equal_the_whole_text_tokens_whatever_the_split(custom_voice_model):
    tokenizer = custom_voice_model.processor.tokenizer
    whole = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    rng = random.Random(1)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(TEXT)), 8))
        pieces = [TEXT[a:b] for a, b in zip([0, *cuts], [*cuts, len(TEXT)])]
        incremental = IncrementalTokenizer(tokenizer)
        committed = []
        for piece in pieces:
            committed += incremental.push(piece)
            assert committed == whole[: len(committed)], "a committed token changed"
        committed += incremental.push("", finished=True)
        assert committed == whole


@pytest.mark.parametrize("speaker", ["ryan", "dylan"])
def test_text_given_up_front_gives_the_official_dual_track_codes(custom_voice_model, speaker):
    official, _wav = official_greedy_codes_and_audio(
        custom_voice_model,
        custom_voice_model.generate_custom_voice,
        text=TEXT,
        speaker=speaker,
        language="english",
        non_streaming_mode=False,
        max_new_tokens=FRAMES + 1,
    )
    ours, _utterance, _ = run_dual_track(custom_voice_model, PresetSpeaker(speaker), [TEXT])
    assert torch.equal(ours, official)


def test_text_in_pieces_split_mid_word_gives_the_same_codes(custom_voice_model):
    whole, _u, _ = run_dual_track(custom_voice_model, PresetSpeaker("ryan"), [TEXT])
    pieces = ["Tu", "rn off the kit", "chen li", "ghts, ple", "ase. It", "'s getting la", "te (alm", "ost 11 p", "m) and I'", "m tired!"]
    for seed in range(3):
        streamed, utterance, first_audio_after = run_dual_track(custom_voice_model, PresetSpeaker("ryan"), pieces, seed=seed)
        assert torch.equal(streamed, whole)
    assert first_audio_after is not None and first_audio_after < len(pieces) - 1, "audio began before the text ended"


def test_an_x_vector_clone_streams_its_text_with_the_official_codes(base_model, reference_sample):
    audio, sample_rate = reference_sample
    item = base_model.create_voice_clone_prompt(ref_audio=(audio, sample_rate), x_vector_only_mode=True)[0]
    official, _wav = official_greedy_codes_and_audio(
        base_model,
        base_model.generate_voice_clone,
        text=TEXT,
        language="english",
        voice_clone_prompt=[item],
        max_new_tokens=FRAMES + 1,
    )
    voice = ClonePrompt(speaker_embedding=item.ref_spk_embedding)
    ours, _utterance, _ = run_dual_track(base_model, voice, ["Turn off the ki", TEXT[len("Turn off the ki") :]])
    assert torch.equal(ours, official)


@pytest.fixture(scope="module")
def engine(checkpoints):
    engine = SpeechEngine.load(EngineOptions(model=str(checkpoints["custom_voice"]), stop=StopRules(base_frames=6, frames_per_token=1, max_frames=200)))
    yield engine
    engine.close()


async def test_text_arriving_with_delays_through_the_engine_gives_the_up_front_codes(engine):
    request = RequestOptions(sampling=GREEDY, non_streaming_mode=False)

    async def codes(pieces, delay):
        job = engine.start(PresetSpeaker("ryan"), request)

        async def writer():
            for piece in pieces:
                job.append_text(piece)
                await asyncio.sleep(delay)
            job.finish()

        with CodeRecorder(engine) as recorder:
            task = asyncio.create_task(writer())
            chunks = [chunk async for chunk in job]
            await task
        assert sum(chunk.frames for chunk in chunks) == recorder.of(job).shape[0]
        return recorder.of(job)

    up_front = await codes([TEXT], 0)
    streamed = await codes(["Turn off the kit", "chen lights, ple", TEXT[len("Turn off the kitchen lights, ple") :]], 0.15)
    assert torch.equal(streamed, up_front)


def settings_with(stream_text_by: str) -> Settings:
    return Settings(requests=RequestLayerOptions(stream_text_by=stream_text_by, defaults=RequestOptions(sampling=GREEDY)))


def process_cpu_seconds() -> float:
    return time.process_time()


async def frames_settled(frames, quiet: float = 0.5, timeout: float = 20.0) -> None:
    """Return once no frame has been made for ``quiet`` seconds (or after ``timeout``: an engine
    that never stops making frames then fails the stall check that follows)."""
    loop = asyncio.get_running_loop()
    deadline, count, since = loop.time() + timeout, frames.frames_generated, loop.time()
    while loop.time() - since < quiet and loop.time() < deadline:
        await asyncio.sleep(0.05)
        if frames.frames_generated != count:
            count, since = frames.frames_generated, loop.time()


async def test_a_stall_waits_without_spinning_and_a_disconnect_frees_the_engine(engine):
    frames = engine.runtimes["custom_voice"].frames
    server = ServerThread(settings_with("words"), engine)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        from wyoming.event import async_read_event, async_write_event

        await async_write_event(SynthesizeStart(voice=SynthesizeVoice(name="Ryan")).event(), writer)
        await async_write_event(SynthesizeChunk(text="Good evening, the front door ").event(), writer)
        first = await asyncio.wait_for(async_read_event(reader), timeout=30)
        assert first.type == "audio-start"
        await frames_settled(frames)  # it uses up the words it has, however slow this machine is
        before_frames, before_cpu = frames.frames_generated, process_cpu_seconds()
        await asyncio.sleep(1.5)  # the stall: connected, no text
        stalled_frames, stalled_cpu = frames.frames_generated - before_frames, process_cpu_seconds() - before_cpu
        assert engine.worker.active_jobs == 1
        writer.close()
        freed = False
        for _ in range(100):
            if engine.worker.active_jobs == 0:
                freed = True
                break
            await asyncio.sleep(0.05)
    finally:
        server.stop()
    assert stalled_frames <= 1, f"{stalled_frames} frames generated during a stall"
    assert stalled_cpu < 0.3, f"{stalled_cpu:.2f} s of CPU during a 1.5 s stall"
    assert freed, "a client leaving during a stall must free the engine"


async def test_over_wyoming_audio_starts_before_the_first_sentence_is_complete(engine):
    server = ServerThread(settings_with("words"), engine)
    words = "When you get home tonight the heating will already be on and the porch light".split()
    try:
        async with server.client() as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="Ryan")).event())
            audio_before_sentence_end = False
            reader = asyncio.create_task(client.read_event())
            started = time.monotonic()
            for word in words:  # 200 ms apart, no sentence end for over 2 s
                await client.write_event(SynthesizeChunk(text=word + " ").event())
                await asyncio.sleep(0.2)
                if reader.done():
                    audio_before_sentence_end = reader.result().type == "audio-start"
                    break
            assert time.monotonic() - started <= 0.2 * len(words) + 1
            await client.write_event(SynthesizeChunk(text="will be on.").event())
            await client.write_event(SynthesizeStop().event())
            if not reader.done():
                await reader
            rest = await read_until(client, "synthesize-stopped")
        assert audio_before_sentence_end, "speech should start from the first words"
        assert rest.types[-1] == "synthesize-stopped" and "audio-stop" in rest.types
    finally:
        server.stop()


async def test_sentence_mode_waits_for_the_sentence(engine):
    server = ServerThread(settings_with("sentences"), engine)
    try:
        async with server.client() as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="Ryan")).event())
            reader = asyncio.create_task(client.read_event())
            for word in "When you get home tonight the heating".split():
                await client.write_event(SynthesizeChunk(text=word + " ").event())
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            assert not reader.done(), "no audio before a sentence is complete"
            await client.write_event(SynthesizeStop().event())
            await reader
            rest = await read_until(client, "synthesize-stopped")
        assert rest.types[-1] == "synthesize-stopped"
    finally:
        server.stop()


def test_streamed_text_is_cut_into_segments_at_sentence_ends_after_the_soft_limit():
    from wyoming_qwen3tts.text import WordStreamSegmenter

    segmenter = WordStreamSegmenter(soft_chars=40, hard_chars=120)
    text = (
        "The first sentence is short. The second one is longer and it goes on for a while. "
        "Then a third. " + "And a run-on sentence without any end that keeps going " * 4
    )
    output = []
    for start in range(0, len(text), 7):
        output += segmenter.add(text[start : start + 7])
    output += segmenter.finish()
    segments, current = [], ""
    for piece, close in output:
        current += piece
        if close:
            segments.append(current)
            current = ""
    assert "".join(segments).replace(" ", "") == text.replace(" ", "")
    assert segments[0].strip() == "The first sentence is short. The second one is longer and it goes on for a while."
    assert all(len(s) <= 120 + 7 for s in segments), [len(s) for s in segments]
