"""The codec in a process of its own: the audio it decodes in process, and failures that stay contained."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch

from wyoming_qwen3tts.engine.codec_process import CodecProcess, CodecProcessError, RemoteDecoderState
from wyoming_qwen3tts.engine.decode import StreamingCodecDecoder
from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.options import EngineOptions, StopRules
from wyoming_qwen3tts.speech import PresetSpeaker, RequestOptions, SamplingOptions, pcm16

GREEDY = SamplingOptions().greedy()


def codes(frames: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2048, (frames, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def codec_process(custom_voice_model):
    process = CodecProcess(channels=2).attach(custom_voice_model.model.speech_tokenizer.model.decoder)
    yield process
    process.close()


def test_the_codec_process_decodes_what_the_decoder_decodes_in_process(custom_voice_model, codec_process):
    local = StreamingCodecDecoder(custom_voice_model.model.speech_tokenizer.model.decoder)
    streams = [codes(19, 1), codes(19, 2)]
    remote_states = [codec_process.new_state(), codec_process.new_state()]
    local_states = [local.new_state(), local.new_state()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child's threads: the same kernels, the same sums
    try:
        start = 0
        for size in (1, 2, 4, 12):
            chunk = [stream[start : start + size] for stream in streams]
            remote = codec_process.decode_batch(remote_states, chunk)
            here = local.decode_batch(local_states, chunk)
            for got, expected in zip(remote, here):
                assert got.shape == (size * 1920,)
                assert torch.equal(got, expected)
            start += size
    finally:
        torch.set_num_threads(threads)
    assert all(state.frames == 19 for state in remote_states)
    assert codec_process.timings.per_frame("codec") > 0


def test_a_decode_that_fails_in_the_codec_process_fails_alone(codec_process):
    broken = codes(2, 3)
    broken[1, 4] = 5000  # no such code: the child's embedding lookup fails
    with pytest.raises(CodecProcessError, match="decoding failed in the codec process: IndexError"):
        codec_process.decode(codec_process.new_state(), broken)
    assert codec_process.decode(codec_process.new_state(), codes(2, 4)).shape == (3840,)


def test_the_codec_process_forgets_the_streams_that_are_gone(codec_process):
    state = codec_process.new_state()
    codec_process.decode(state, codes(1, 5))
    # A second handle to the same decoder state, without the first one's farewell.
    same = RemoteDecoderState(state.id, state.generation, started=True)
    codec_process.decode(same, codes(1, 6))
    del state  # the stream is gone: the next call tells the child
    codec_process.decode(codec_process.new_state(), codes(1, 7))
    with pytest.raises(CodecProcessError, match="this stream's decoder state is gone"):
        codec_process.decode(same, codes(1, 8))


def test_after_the_codec_process_dies_its_streams_fail_and_new_ones_get_a_new_process(custom_voice_model, codec_process):
    process = codec_process  # the last test of the module's process: it restarts it
    old = process.new_state()
    process.decode(old, codes(2, 7))
    # A request that starts before anyone notices the child died: its first decode restarts it.
    waiting = process.new_state()
    first_pid = process.pid
    os.kill(first_pid, signal.SIGKILL)
    process._process.join(10)
    with pytest.raises(CodecProcessError, match="restarted and this stream's audio cannot continue"):
        process.decode(old, codes(2, 8))
    assert process.pid != first_pid
    local = StreamingCodecDecoder(custom_voice_model.model.speech_tokenizer.model.decoder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(process.decode(waiting, codes(3, 9)), local.decode(local.new_state(), codes(3, 9)))
        assert torch.equal(process.decode(process.new_state(), codes(3, 10)), local.decode(local.new_state(), codes(3, 10)))
    finally:
        torch.set_num_threads(threads)


# Through the engine.


@pytest.fixture(scope="module")
def engines(checkpoints):
    stop = StopRules(base_frames=30, frames_per_token=0, max_frames=30)
    own = SpeechEngine.load(EngineOptions(model=str(checkpoints["custom_voice"]), stop=stop, max_batch=4, codec_process=True))
    threads = SpeechEngine.load(EngineOptions(model=str(checkpoints["custom_voice"]), stop=stop, max_batch=4, codec_process=False))
    yield own, threads
    own.close()
    threads.close()


async def speech(engine, text: str, speaker: str = "ryan") -> bytes:
    job = engine.start(PresetSpeaker(speaker), RequestOptions(sampling=GREEDY))
    job.add_text(text)
    job.finish()
    return b"".join([pcm16(chunk.audio) async for chunk in job])


async def test_an_engine_with_its_codec_in_a_process_speaks_as_with_decode_threads(engines):
    own, threads = engines
    assert isinstance(own.runtimes["custom_voice"].decoder, CodecProcess)
    assert isinstance(threads.runtimes["custom_voice"].decoder, StreamingCodecDecoder)
    texts = ["Good morning, the kitchen lights are on.", "The front door is locked.", "It is raining.", "Timer set."]
    speakers = ["ryan", "vivian", "aiden", "serena"]
    together = await asyncio.gather(*(speech(own, t, s) for t, s in zip(texts, speakers)))
    for audio, text, speaker in zip(together, texts, speakers):
        assert len(audio) == 30 * 1920 * 2, "every stream plays to the end"
        reference = await speech(threads, text, speaker)
        assert audio == reference or max_sample_difference(audio, reference) <= 1


def max_sample_difference(a: bytes, b: bytes) -> int:
    import numpy as np

    return int(np.abs(np.frombuffer(a, np.int16).astype(np.int32) - np.frombuffer(b, np.int16).astype(np.int32)).max())


async def test_a_stream_whose_codec_process_dies_fails_and_the_next_request_plays(engines):
    own, _threads = engines
    decoder = own.runtimes["custom_voice"].decoder
    job = own.start(PresetSpeaker("ryan"), RequestOptions(sampling=GREEDY))
    job.add_text("The washing machine has finished.")
    job.finish()
    chunks = aiter(job)
    await anext(chunks)  # first audio: the child holds this stream's decoder state now
    os.kill(decoder.pid, signal.SIGKILL)
    with pytest.raises(CodecProcessError, match="codec process"):
        async for _chunk in chunks:
            pass
    assert len(await speech(own, "Dinner is ready.")) == 30 * 1920 * 2


def test_an_engine_whose_codec_process_cannot_start_decodes_on_threads(checkpoints, monkeypatch, caplog):
    from wyoming_qwen3tts.engine import engine as engine_module

    closed = []

    class NoSharedMemory:
        def __init__(self, channels: int, threads: int) -> None:
            pass

        def attach(self, decoder):
            raise CodecProcessError("the codec's weights could not be shared with the codec process (no space left)")

        def close(self) -> None:
            closed.append(True)

    monkeypatch.setattr(engine_module, "CodecProcess", NoSharedMemory)
    stop = StopRules(base_frames=6, frames_per_token=0, max_frames=6)
    engine = SpeechEngine.load(EngineOptions(model=str(checkpoints["custom_voice"]), stop=stop, codec_process=True))
    try:
        assert isinstance(engine.runtimes["custom_voice"].decoder, StreamingCodecDecoder)
        assert "Decoding audio on threads of this process instead" in caplog.text and "no space left" in caplog.text
        assert closed, "the child that could not start is ended"
        assert len(asyncio.run(speech(engine, "Lights off."))) == 6 * 1920 * 2
    finally:
        engine.close()
