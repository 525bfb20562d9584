"""The remote engine: vLLM-Omni's request shape, replicas and fail-over, an instance as remote."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time

import pytest
import soundfile
import yaml
from wyoming.tts import Synthesize, SynthesizeVoice

from helpers import ServerThread, free_port, is_one_audio_cycle, read_until, voice_like_sample
from vllm_omni_double import BASE_MODEL, VllmOmniDouble

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.options import EngineOptions, StopRules
from wyoming_qwen3tts.http_api.app import HttpApiOptions
from wyoming_qwen3tts.remote.engine import RemoteOptions
from wyoming_qwen3tts.request import RequestLayerOptions
from wyoming_qwen3tts.settings import Settings
from wyoming_qwen3tts.speech import RequestOptions, SamplingOptions
from wyoming_qwen3tts.voices import VoiceOptions

TRANSCRIPT = "Hello dear, come in and sit down."


@pytest.fixture
def sample_dir(tmp_path):
    soundfile.write(tmp_path / "grandma.wav", voice_like_sample(4.0, 16000), 16000)
    (tmp_path / "voices.yaml").write_text(
        yaml.safe_dump({"voices": [{"name": "Grandma", "audio": "grandma.wav", "transcript": TRANSCRIPT}]})
    )
    return tmp_path


def front_settings(urls, sample_dir=None, **remote) -> Settings:
    settings = Settings(remote=RemoteOptions(urls=tuple(urls), retry_after=0.5, **remote))
    if sample_dir is not None:
        settings = dataclasses.replace(
            settings, voices=VoiceOptions(voices_file=sample_dir / "voices.yaml"), engine=EngineOptions(data_dir=sample_dir / "data")
        )
    return settings


async def speak(server, text: str, voice: str):
    async with server.client() as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice)).event())
        return await read_until(client, "audio-stop", timeout=60)


@pytest.mark.parametrize("accepts_uploads", [False, True], ids=["per-request-sample", "uploaded-once"])
async def test_requests_have_vllm_omni_shape(sample_dir, accepts_uploads):
    double = VllmOmniDouble(free_port(), accepts_uploads=accepts_uploads, model=BASE_MODEL)
    double.start()
    front = ServerThread(front_settings([double.url], sample_dir))
    try:
        preset = await speak(front, "Hello there.", "Ryan")
        clone_first = await speak(front, "Dinner is ready.", "grandma")
        clone_again = await speak(front, "Come and eat.", "Grandma")
    finally:
        front.stop()
        double.stop()
    for cycle in (preset, clone_first, clone_again):
        assert is_one_audio_cycle(cycle.types) and len(cycle.audio) == 2 * 24000
    common = {"model": BASE_MODEL, "language": "Auto", "response_format": "pcm", "stream": True, "stream_format": "audio"}
    assert double.speech_requests[0] == {**common, "input": "Hello there.", "voice": "ryan", "task_type": "CustomVoice"}
    sample = (sample_dir / "grandma.wav").read_bytes()
    if accepts_uploads:
        assert len(double.uploads) == 1, "the clone sample is uploaded once"
        upload = double.uploads[0]
        assert upload["ref_text"] == TRANSCRIPT and upload["consent"] and upload["audio_bytes"] == len(sample)
        for request, text in zip(double.speech_requests[1:], ("Dinner is ready.", "Come and eat.")):
            assert request == {**common, "input": text, "voice": upload["name"], "task_type": "Base"}
    else:
        for request, text in zip(double.speech_requests[1:], ("Dinner is ready.", "Come and eat.")):
            ref_audio = request.pop("ref_audio")
            assert request == {**common, "input": text, "task_type": "Base", "ref_text": TRANSCRIPT}
            assert ref_audio.startswith("data:audio/") and base64.b64decode(ref_audio.split(",", 1)[1]) == sample


async def test_a_dead_replica_is_avoided_its_unstarted_request_retried_and_it_is_used_again_once_back():
    a, b = VllmOmniDouble(free_port()), VllmOmniDouble(free_port())
    a.start()
    b.start()
    front = ServerThread(front_settings([a.url, b.url]))
    try:
        a.first_byte_delay = 1.5  # A takes the first request and has sent no audio yet ...
        pending = asyncio.create_task(speak(front, "First request.", "vivian"))
        await asyncio.sleep(0.5)
        assert len(a.speech_requests) == 1
        a.stop()  # ... when it goes away.
        first = await pending
        assert is_one_audio_cycle(first.types), "retried on the other replica"
        assert [r["input"] for r in b.speech_requests] == ["First request."]

        started = time.monotonic()
        later = await asyncio.gather(*(speak(front, f"Later {i}.", "vivian") for i in range(3)))
        assert all(is_one_audio_cycle(c.types) for c in later)
        assert len(b.speech_requests) == 4 and time.monotonic() - started < 5, "no time lost on the dead replica"

        back = VllmOmniDouble(a.port)  # the same address, restarted
        back.start()
        await asyncio.sleep(0.7)  # past the retry pause
        again = await asyncio.gather(*(speak(front, f"Again {i}.", "vivian") for i in range(2)))
        assert all(is_one_audio_cycle(c.types) for c in again)
        assert len(back.speech_requests) >= 1, "the replica is used again once it is back"
        back.stop()
    finally:
        front.stop()
        b.stop()


async def test_a_replica_failing_mid_audio_gives_the_client_a_clean_error():
    double = VllmOmniDouble(free_port())
    double.start()
    front = ServerThread(front_settings([double.url]))
    try:
        double.fail = "mid-audio"
        async with front.client() as client:
            await client.write_event(Synthesize(text="Hello there.", voice=SynthesizeVoice(name="ryan")).event())
            cycle = await read_until(client, "audio-stop", timeout=30)
            assert cycle.types[0] == "audio-start" and "audio-chunk" in cycle.types
            assert cycle.types[-1] == "error"
            assert await client.read_event() is None
        double.fail = None
        assert is_one_audio_cycle((await speak(front, "Fine again.", "ryan")).types)
        assert len(double.speech_requests) == 2, "audio had started, so the failed request was not retried"
    finally:
        front.stop()
        double.stop()


async def test_an_unknown_voice_at_the_remote_is_a_clean_error(sample_dir):
    double = VllmOmniDouble(free_port())
    double.start()
    front = ServerThread(front_settings([double.url]))
    try:
        cycle = await speak(front, "Hi.", "nobody")
        assert cycle.types == ["error"] and "Unknown voice" in cycle.events[0].data["text"]
    finally:
        front.stop()
        double.stop()


async def test_a_clone_voice_through_a_second_instance_as_remote(checkpoints, sample_dir):
    stop = StopRules(base_frames=4, frames_per_token=0.25, max_frames=40)
    engine = SpeechEngine.load(
        EngineOptions(model=str(checkpoints["custom_voice"]), clone_model=str(checkpoints["base"]), stop=stop, data_dir=sample_dir / "backend")
    )
    backend = ServerThread(
        Settings(
            http=HttpApiOptions(port=0, clones=True),
            requests=RequestLayerOptions(defaults=RequestOptions(sampling=SamplingOptions().greedy())),
        ),
        engine,
    )
    front = ServerThread(front_settings([backend.http_url], sample_dir))
    try:
        clone = await speak(front, "Dinner is ready.", "Grandma")
        preset = await speak(front, "Dinner is ready.", "Ryan")
    finally:
        front.stop()
        backend.stop()
        engine.close()
    assert is_one_audio_cycle(clone.types) and len(clone.audio) > 0
    assert clone.audio != preset.audio


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_a_remote_url_may_be_given_with_or_without_v1(suffix):
    assert RemoteOptions(urls=(f"http://gpu-box:8091{suffix}",)).urls == ("http://gpu-box:8091",)


async def test_a_remote_serving_only_presets_does_not_clone_and_says_so(sample_dir, caplog):
    double = VllmOmniDouble(free_port())  # a CustomVoice model: presets only
    double.start()
    front = ServerThread(front_settings([double.url + "/v1"], sample_dir))
    try:
        assert not front.engine.can_clone
        cycle = await speak(front, "Hello there.", "Ryan")
        refused = await speak(front, "Dinner is ready.", "Grandma")
    finally:
        front.stop()
        double.stop()
    assert is_one_audio_cycle(cycle.types)
    assert refused.types == ["error"] and "Unknown voice 'Grandma'" in refused.events[0].data["text"]
    assert "this backend cannot clone: Grandma skipped" in caplog.text


async def describe_voices(server) -> list[str]:
    from wyoming.info import Describe, Info

    async with server.client() as client:
        await client.write_event(Describe().event())
        cycle = await read_until(client, "info", timeout=10)
    return [voice.name for voice in Info.from_event(cycle.events[-1]).tts[0].voices]


async def test_a_front_whose_remote_is_down_at_start_waits_for_it_and_serves_once_it_answers(caplog):
    double = VllmOmniDouble(free_port())  # not started yet: the GPU box is still booting
    front = ServerThread(front_settings([double.url]))
    try:
        assert await describe_voices(front) == []
        refused = await speak(front, "Hello there.", "Ryan")
        assert refused.types == ["error"] and "No voices yet" in refused.events[0].data["text"]
        assert "no remote speech server answered" in caplog.text and "trying again" in caplog.text

        double.start()
        for _ in range(100):  # the front retries after 1, 2, 4 ... s
            if await describe_voices(front):
                break
            await asyncio.sleep(0.1)
        assert "Ryan" in await describe_voices(front)
        assert is_one_audio_cycle((await speak(front, "Hello there.", "Ryan")).types)

        double.stop()  # the remote goes away ...
        gone = await speak(front, "Are you there?", "Ryan")
        assert gone.types[-1] == "error" and "audio-chunk" not in gone.types
        back = VllmOmniDouble(double.port)  # ... and comes back
        back.start()
        await asyncio.sleep(0.7)  # past the retry pause
        assert is_one_audio_cycle((await speak(front, "Welcome back.", "Ryan")).types)
        back.stop()
    finally:
        front.stop()
