"""While the codec has nothing to decode, the model thread's rounds run on every core.

On a CPU the engine keeps cores free for decoding; on an idle server they would idle through a
new request's prefill, first frame and first chunk: the whole wait for its first audio. These
tests hold the decode threads busy to tell the two cases apart, and prove that the number of
threads changes no code (float32 and int8).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import types
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from helpers import CodeRecorder

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.loader import usable_cores
from wyoming_qwen3tts.engine.options import CPU_DECODE_THREADS, EngineOptions, LoadOptions, StopRules
from wyoming_qwen3tts.speech import PresetSpeaker, RequestOptions, SamplingOptions

FRAMES = 20
TEXT = "The kitchen lights are on."


@pytest.fixture(scope="module", params=["none", "int8"])
def engine(request, checkpoints):
    engine = SpeechEngine.load(
        EngineOptions(
            model=str(checkpoints["custom_voice"]),
            load=LoadOptions(device="cpu", quantize=request.param, threads=1),
            stop=StopRules(base_frames=FRAMES, frames_per_token=0, max_frames=FRAMES),
        )
    )
    yield engine
    engine.close()


class DecodeCalls:
    """Which thread decoded each codec call, on how many PyTorch threads, and its chunks' first frames."""

    def __init__(self, engine, monkeypatch, role: str = "custom_voice") -> None:
        self.calls: list[tuple[str, int, list[int]]] = []
        runtime = engine.runtimes[role]
        original = runtime.decode_batch

        def decode_batch(utterances, chunks):
            self.calls.append((threading.current_thread().name, torch.get_num_threads(), [c.first_frame for c in chunks]))
            return original(utterances, chunks)

        monkeypatch.setattr(runtime, "decode_batch", decode_batch)


class ThreadCounts:
    """PyTorch's thread count on the model thread at every prefill and every step."""

    def __init__(self, engine, monkeypatch) -> None:
        self.prefills: list[int] = []
        self.steps: list[int] = []
        self.engine = engine
        frames = engine.runtimes["custom_voice"].frames
        original = frames.prefill

        def prefill(*args, **kwargs):
            self.prefills.append(torch.get_num_threads())
            return original(*args, **kwargs)

        monkeypatch.setattr(frames, "prefill", prefill)

    def __enter__(self) -> "ThreadCounts":
        self.engine.worker.step_listeners.append(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self.engine.worker.step_listeners.remove(self._record)

    def _record(self, _job_ids) -> None:
        self.steps.append(torch.get_num_threads())


@contextmanager
def codec_held(engine):
    """Every decode thread busy (with work that waits) until the block ends."""
    release, running = threading.Event(), threading.Semaphore(0)

    def hold() -> None:
        running.release()
        release.wait(30)

    for _ in range(CPU_DECODE_THREADS):
        engine.worker.after_decoding(types.SimpleNamespace(deadline=0.0), hold)
    for _ in range(CPU_DECODE_THREADS):
        assert running.acquire(timeout=10), "a decode thread did not take the held work"
    try:
        yield
    finally:
        release.set()


def start(engine):
    job = engine.start(PresetSpeaker("ryan"), RequestOptions(sampling=SamplingOptions().greedy()))
    job.add_text(TEXT)
    job.finish()
    return job


pytestmark = pytest.mark.skipif(usable_cores() < 2, reason="needs two cores")


MODEL_THREAD = "qwen3tts-engine"


async def test_a_request_on_an_idle_server_starts_on_every_core(engine, monkeypatch):
    decodes = DecodeCalls(engine, monkeypatch)
    with ThreadCounts(engine, monkeypatch) as counts:
        audio = [chunk async for chunk in start(engine)]
    assert counts.prefills == [usable_cores()]
    assert counts.steps[0] == usable_cores(), "the first frame is made before any audio exists"
    assert decodes.calls[0] == (MODEL_THREAD, usable_cores(), [0]), "the first chunk decodes at once, on every core"
    assert all(name != MODEL_THREAD for name, _threads, _frames in decodes.calls[1:]), "later chunks decode beside generation"
    assert sum(chunk.frames for chunk in audio) == FRAMES


async def test_while_the_codec_decodes_the_model_keeps_to_its_own_threads_and_makes_the_same_codes(engine, monkeypatch):
    """A request that arrives while every decode thread is busy: the model keeps to its own
    threads, and the request's first chunk decodes on the model thread, not behind the queue."""
    with CodeRecorder(engine) as codes:
        idle = start(engine)
        idle_audio = [chunk async for chunk in idle]
        decodes = DecodeCalls(engine, monkeypatch)
        with ThreadCounts(engine, monkeypatch) as counts, codec_held(engine):
            busy = start(engine)
            chunks = aiter(busy)
            # The hold lasts up to 30 s: a first chunk queued behind it would not come in 10.
            first = await asyncio.wait_for(anext(chunks), 10)
            for _ in range(500):  # its later chunks wait behind the held codec; the frames do not
                if len(counts.steps) == FRAMES:
                    break
                await asyncio.sleep(0.01)
        audio = [first] + [chunk async for chunk in chunks]
    assert counts.prefills == [1] and counts.steps == [1] * FRAMES
    assert sum(chunk.frames for chunk in audio) == FRAMES
    assert torch.equal(codes.of(busy), codes.of(idle)), "the thread count changed the codes"
    assert decodes.calls[0] == (MODEL_THREAD, 1, [0]), "the first chunk decodes at once, on the model's own threads"
    # Decode threads run on the cores the model's one thread leaves (at least one).
    assert engine.worker.codec_threads == max(1, usable_cores() - 1)
    assert len(decodes.calls) > 1
    assert all(name != MODEL_THREAD and threads == engine.worker.codec_threads for name, threads, _frames in decodes.calls[1:])
    # The codec's convolutions may round differently on two threads: the same audio within float noise.
    np.testing.assert_allclose(np.concatenate([c.audio for c in audio]), np.concatenate([c.audio for c in idle_audio]), atol=1e-5)


async def test_a_clone_s_first_chunk_decodes_beside_generation_with_its_reference(checkpoints, reference_sample, tmp_path, monkeypatch):
    engine = SpeechEngine.load(
        EngineOptions(
            model=str(checkpoints["custom_voice"]),
            clone_model=str(checkpoints["base"]),
            data_dir=tmp_path,
            load=LoadOptions(device="cpu", threads=1),
            stop=StopRules(base_frames=8, frames_per_token=0, max_frames=8),
        )
    )
    try:
        audio, rate = reference_sample
        clone = await engine.create_clone_prompt(audio, rate, "This is the reference transcript.")
        assert clone.ref_codes is not None, "an in-context clone, whose audio continues its reference"
        decodes = DecodeCalls(engine, monkeypatch, role="base")
        job = engine.start(clone, RequestOptions(sampling=SamplingOptions().greedy()))
        job.add_text(TEXT)
        job.finish()
        chunks = [chunk async for chunk in job]
    finally:
        engine.close()
    assert sum(chunk.frames for chunk in chunks) == 8
    assert decodes.calls and all(name != MODEL_THREAD for name, _threads, _frames in decodes.calls)


def test_importing_the_package_keeps_openmp_to_one_thread_unless_told_otherwise():
    script = "import os, wyoming_qwen3tts, torch; print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())"
    environ = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    default = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, check=True)
    assert default.stdout.split() == ["1", "1"]
    told = subprocess.run([sys.executable, "-c", script], env={**environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, check=True)
    assert told.stdout.split() == ["2", "2"]


def test_decode_threads_run_on_the_cores_the_model_leaves_and_the_model_keeps_its_own():
    """PyTorch's thread count is per process until a thread sets its own: decode threads that took
    it would each run a team as large as the model's (on 4 cores 3 + 3 threads)."""
    from concurrent.futures import Future

    from wyoming_qwen3tts.engine.worker import EngineWorker

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        worker = EngineWorker(decode_threads=2, codec_threads=1)
        try:
            model = worker.submit(torch.get_num_threads).result(10)
            # Two jobs' work at once, so that both decode threads run one.
            together = threading.Barrier(2, timeout=10)
            decoded = [Future(), Future()]

            def decode(done: Future) -> None:
                together.wait()
                done.set_result(torch.get_num_threads())

            for done in decoded:
                worker.after_decoding(types.SimpleNamespace(deadline=0.0), lambda done=done: decode(done))
            decode_threads = [done.result(15) for done in decoded]
            later: list[int] = []  # a thread started afterwards takes the process's count: the model's
            thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
            thread.start()
            thread.join()
        finally:
            worker.stop()
    finally:
        torch.set_num_threads(before)
    assert model == 2
    assert decode_threads == [1, 1]
    assert later == [2]
