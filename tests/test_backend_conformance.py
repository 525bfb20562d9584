"""One suite, two backends: the local engine and the remote engine keep the same `SpeechBackend` contract.

The remote engine talks to a second instance's HTTP API (backed by its own local engine), the
way a front talks to a GPU box.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from helpers import ServerThread, voice_like_sample

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.options import EngineOptions, StopRules
from wyoming_qwen3tts.http_api.app import HttpApiOptions
from wyoming_qwen3tts.reference_audio import clone_source
from wyoming_qwen3tts.remote.engine import RemoteEngine, RemoteOptions
from wyoming_qwen3tts.request import RequestLayerOptions
from wyoming_qwen3tts.settings import Settings
from wyoming_qwen3tts.speech import (
    AudioChunk,
    JobCancelled,
    PresetSpeaker,
    RequestOptions,
    SamplingOptions,
    SpeechBackend,
    SpeechJob,
)

FRAMES = 6  # random weights never stop by themselves: every segment runs to this cap
STOP = StopRules(base_frames=FRAMES, frames_per_token=0, max_frames=FRAMES)
GREEDY = RequestOptions(sampling=SamplingOptions().greedy())


def load_engine(checkpoints, tmp_path_factory) -> SpeechEngine:
    return SpeechEngine.load(
        EngineOptions(
            model=str(checkpoints["custom_voice"]),
            clone_model=str(checkpoints["base"]),
            stop=STOP,
            data_dir=tmp_path_factory.mktemp("conformance-data"),
        )
    )


@pytest.fixture(scope="module")
def local_engine(checkpoints, tmp_path_factory):
    engine = load_engine(checkpoints, tmp_path_factory)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def remote_server(local_engine):
    settings = Settings(http=HttpApiOptions(port=0, clones=True), requests=RequestLayerOptions(defaults=GREEDY))
    server = ServerThread(settings, local_engine)
    yield server
    server.stop()


@pytest.fixture(params=["local", "remote"])
async def backend(request, local_engine):
    if request.param == "local":
        yield local_engine
        return
    server = request.getfixturevalue("remote_server")
    engine = RemoteEngine(RemoteOptions(urls=(server.http_url,)))
    await engine.connect()
    yield engine
    await engine.aclose()


async def chunks_of(job: SpeechJob) -> list[AudioChunk]:
    return [chunk async for chunk in job]


async def wait_idle(backend: SpeechBackend) -> None:
    for _ in range(100):
        if backend.active_jobs == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{backend.active_jobs} jobs still active")


def test_a_backend_describes_what_it_speaks(backend):
    assert isinstance(backend, SpeechBackend)
    assert "ryan" in [name.lower() for name in backend.speakers]
    assert backend.languages[0] == "auto" and "english" in backend.languages
    assert backend.can_clone is True
    assert backend.streams_text(PresetSpeaker("ryan")) in (True, False)


async def test_whole_segments_come_back_as_audio_in_order(backend):
    job = backend.start(PresetSpeaker("Ryan"), GREEDY)
    assert isinstance(job, SpeechJob)
    job.add_text("Good morning.")
    job.add_text("   ")  # blank text is skipped
    job.add_text("The kitchen lights are on.")
    job.finish()
    chunks = await chunks_of(job)
    assert chunks and all(isinstance(c, AudioChunk) and c.audio.dtype == np.float32 for c in chunks)
    assert [c.segment for c in chunks] == sorted(c.segment for c in chunks) and {c.segment for c in chunks} == {0, 1}
    assert sum(c.frames for c in chunks) == 2 * FRAMES
    stats = job.stats
    assert stats.segments == 2 and stats.frames == 2 * FRAMES and stats.characters == len("Good morning.The kitchen lights are on.")
    assert stats.time_to_first_audio is not None and stats.real_time_factor is not None
    await wait_idle(backend)


async def test_appended_text_closes_into_segments(backend):
    job = backend.start(PresetSpeaker("ryan"), GREEDY)
    for piece in ("Turn off ", "the lights"):
        job.append_text(piece)
    job.close_segment()
    job.append_text("and lock the door.")
    job.finish()
    chunks = await chunks_of(job)
    assert job.stats.segments == 2 and sum(c.frames for c in chunks) == 2 * FRAMES
    with pytest.raises(RuntimeError):
        job.append_text("too late")
    await wait_idle(backend)


async def start_long_job(backend: SpeechBackend):
    """A job of 20 sentences that has begun to speak, and its chunk iterator."""
    job = backend.start(PresetSpeaker("ryan"), GREEDY)
    for index in range(20):
        job.add_text(f"Sentence number {index}.")
    job.finish()
    chunks = job.__aiter__()
    await anext(chunks)
    return job, chunks


async def test_a_cancelled_job_ends_with_job_cancelled_and_frees_the_backend(backend):
    job, chunks = await start_long_job(backend)
    job.cancel()
    with pytest.raises(JobCancelled):
        async for _chunk in chunks:
            pass
    await wait_idle(backend)


async def test_an_unknown_speaker_is_refused_at_start(backend):
    with pytest.raises(ValueError, match="nobody"):
        backend.start(PresetSpeaker("nobody"), GREEDY)


async def test_a_cloned_voice_speaks(backend):
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, voice_like_sample(4.0, 16000, seed=5), 16000, format="WAV")
    source = clone_source(buffer.getvalue(), "test sample", "Hello there, this is my voice.", "mine.wav")
    voice, _computed = await backend.clone(source)
    job = backend.start(voice, GREEDY)
    job.add_text("Dinner is ready.")
    job.finish()
    chunks = await chunks_of(job)
    assert sum(c.frames for c in chunks) == FRAMES and np.abs(np.concatenate([c.audio for c in chunks])).max() > 0
    await wait_idle(backend)


@pytest.mark.parametrize("kind", ["local", "remote"])
async def test_closing_a_backend_ends_its_running_jobs(kind, checkpoints, tmp_path_factory, request):
    if kind == "local":
        backend = await asyncio.to_thread(load_engine, checkpoints, tmp_path_factory)
    else:
        backend = RemoteEngine(RemoteOptions(urls=(request.getfixturevalue("remote_server").http_url,)))
        await backend.connect()
    _job, chunks = await start_long_job(backend)
    await backend.aclose()
    with pytest.raises(JobCancelled):
        async for _chunk in chunks:
            pass
    assert backend.active_jobs == 0
