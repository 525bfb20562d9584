"""The OpenAI-compatible speech API, driven by the official `openai` client."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import aiohttp
import numpy as np
import openai
import pytest
import soundfile

from helpers import ServerThread, voice_like_sample

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.options import EngineOptions, StopRules
from wyoming_qwen3tts.http_api.app import HttpApiOptions
from wyoming_qwen3tts.request import RequestLayerOptions
from wyoming_qwen3tts.settings import Settings
from wyoming_qwen3tts.speech import RequestOptions, SamplingOptions
from wyoming_qwen3tts.voices import VoiceOptions

STOP = StopRules(base_frames=4, frames_per_token=0.25, max_frames=40)
KEY = "test-key"
SHORT = "The lights are on."


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("voices-root")
    voices = root / "voices"
    voices.mkdir()
    sample = voice_like_sample(4.0, 24000)
    soundfile.write(voices / "mine.wav", sample, 24000)
    soundfile.write(root / "outside.wav", sample, 24000)
    (voices / "escape.wav").symlink_to(root / "outside.wav")
    return voices


@pytest.fixture(scope="module")
def server(checkpoints, voices_dir, tmp_path_factory):
    engine_options = EngineOptions(
        model=str(checkpoints["custom_voice"]), clone_model=str(checkpoints["base"]), stop=STOP, data_dir=tmp_path_factory.mktemp("http-data")
    )
    engine = SpeechEngine.load(engine_options)
    settings = Settings(
        engine=engine_options,
        voices=VoiceOptions(voices_dir=voices_dir),
        requests=RequestLayerOptions(defaults=RequestOptions(sampling=SamplingOptions().greedy())),
        http=HttpApiOptions(port=0, api_key=KEY, clones=True, max_body_bytes=2 << 20, max_reference_bytes=2 << 20),
    )
    server = ServerThread(settings, engine)
    yield server
    server.stop()
    engine.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http.port}/v1", api_key=KEY, max_retries=0, timeout=120)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    audio, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    return audio, rate


def test_speech_create_writes_an_audio_file(client, tmp_path):
    response = client.audio.speech.create(model="qwen3-tts", voice="Vivian", input=SHORT, response_format="wav")
    path = tmp_path / "speech.wav"
    response.write_to_file(path)
    audio, rate = soundfile.read(path, dtype="float32")
    assert rate == 24000 and audio.ndim == 1
    assert len(audio) > 0 and len(audio) % 1920 == 0
    assert np.sqrt(np.mean(audio**2)) > 0.01


@pytest.mark.parametrize("response_format", ["mp3", "flac", "opus"])
def test_encoded_formats_decode_to_the_same_length(client, response_format):
    wav, _ = decode(client.audio.speech.create(model="x", voice="ryan", input=SHORT, response_format="wav").content)
    encoded, rate = decode(client.audio.speech.create(model="x", voice="ryan", input=SHORT, response_format=response_format).content)
    assert rate == 24000
    assert abs(len(encoded) - len(wav)) < 0.1 * 24000, (len(encoded), len(wav))


def test_pcm_is_raw_16_bit_samples(client):
    pcm = client.audio.speech.create(model="x", voice="ryan", input=SHORT, response_format="pcm").content
    wav, _ = decode(client.audio.speech.create(model="x", voice="ryan", input=SHORT, response_format="wav").content)
    assert len(pcm) == 2 * len(wav)
    assert np.abs(np.frombuffer(pcm, "<i2") / 32767.0 - wav).max() < 1e-3


def test_the_default_format_is_mp3_as_in_openais_api(client):
    data = client.audio.speech.create(model="x", voice="ryan", input=SHORT).content
    assert data[:3] == b"ID3" or data[0] == 0xFF


def test_streaming_response_delivers_bytes_before_generation_ends(client, server):
    text = " ".join(f"This is sentence number {i} of the story." for i in range(6))
    started = time.monotonic()
    with client.audio.speech.with_streaming_response.create(
        model="qwen3-tts", voice="Aiden", input=text, response_format="pcm"
    ) as response:
        assert response.headers["content-type"].startswith("audio/pcm")
        pieces = response.iter_bytes()
        first = next(pieces)
        first_at = time.monotonic() - started
        still_generating = server.engine.worker.active_jobs
        rest = b"".join(pieces)
    total = time.monotonic() - started
    assert len(first) > 0
    assert still_generating >= 1, "the first bytes arrived while the engine was still generating"
    assert first_at < total / 2
    assert len(first) + len(rest) > 20 * 3840


def test_sse_stream_carries_base64_pcm_and_a_done_event(server):
    import requests

    url = f"http://127.0.0.1:{server.http.port}/v1/audio/speech"
    body = {"model": "x", "voice": "ryan", "input": SHORT, "response_format": "pcm", "stream_format": "sse"}
    with requests.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, stream=True, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert len(pcm) > 0 and len(pcm) % 2 == 0


def test_one_off_clone_through_extra_body_is_spoken_and_cached(client, server):
    computed_before = server.engine.clones_computed
    buffer = io.BytesIO()
    soundfile.write(buffer, voice_like_sample(5.0, 16000, seed=3), 16000, format="FLAC")
    data_uri = "data:audio/flac;base64," + base64.b64encode(buffer.getvalue()).decode()
    extra = {"reference_audio": data_uri, "reference_text": "Hello there, this is my voice."}
    first = client.audio.speech.create(model="x", voice="anything", input=SHORT, response_format="wav", extra_body=extra)
    second = client.audio.speech.create(model="x", voice="anything", input=SHORT, response_format="wav", extra_body=extra)
    preset = client.audio.speech.create(model="x", voice="ryan", input=SHORT, response_format="wav")
    assert server.engine.clones_computed - computed_before == 1, "the second request reuses the cached prompt"
    assert first.content == second.content != preset.content

    by_path = client.audio.speech.create(
        model="x", voice="x", input=SHORT, response_format="wav", extra_body={"ref_audio": "mine.wav", "task_type": "Base"}
    )
    assert len(decode(by_path.content)[0]) > 0


async def test_a_multipart_upload_clones_a_voice(server):
    buffer = io.BytesIO()
    soundfile.write(buffer, voice_like_sample(4.0, 22050, seed=5), 22050, format="WAV")
    form = aiohttp.FormData()
    form.add_field("input", SHORT)
    form.add_field("voice", "x")
    form.add_field("response_format", "wav")
    form.add_field("reference_text", "Good evening everybody.")
    form.add_field("reference_audio", buffer.getvalue(), filename="me.wav", content_type="audio/wav")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        async with session.post(f"http://127.0.0.1:{server.http.port}/v1/audio/speech", data=form) as response:
            assert response.status == 200, await response.text()
            audio, rate = decode(await response.read())
    assert rate == 24000 and len(audio) > 0


def expect_error(call, status: int, *fragments: str) -> dict:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    error = info.value
    assert error.status_code == status, error
    body = error.body
    assert set(body) >= {"message", "type", "param", "code"}, body
    for fragment in fragments:
        assert fragment in body["message"], body
    return body


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server):
    speech = client.audio.speech.create
    body = expect_error(lambda: speech(model="x", voice="alloy", input=SHORT), 400, "Unknown voice 'alloy'", "Ryan")
    assert body["param"] == "voice" and body["type"] == "invalid_request_error"
    expect_error(lambda: speech(model="x", voice="ryan", input=SHORT, response_format="aac"), 400, "'aac' is not supported")
    expect_error(lambda: speech(model="x", voice="ryan", input=SHORT, speed=1.5), 400, "speed")
    expect_error(lambda: speech(model="x", voice="ryan", input="   "), 400, "'input' is empty")
    for path in ("../outside.wav", str(server.settings.samples_dir.parent / "outside.wav"), "/etc/passwd", "escape.wav", "file:///etc/passwd"):
        body = expect_error(lambda path=path: speech(model="x", voice="x", input=SHORT, extra_body={"reference_audio": path}), 403, "outside the voices folder")
        assert body["type"] == "permission_error"
    expect_error(lambda: speech(model="x", voice="x", input=SHORT, extra_body={"reference_audio": "missing.wav"}), 400, "no file")
    expect_error(lambda: speech(model="x", voice="x", input=SHORT, extra_body={"reference_audio": "https://example.com/a.wav"}), 400, "URLs are not fetched")
    not_audio = "data:audio/wav;base64," + base64.b64encode(b"RIFF" + b"\0" * 5000).decode()
    expect_error(lambda: speech(model="x", voice="x", input=SHORT, extra_body={"reference_audio": not_audio}), 400, "cannot read the audio")
    huge = "data:audio/wav;base64," + "A" * (3 << 20)
    expect_error(lambda: speech(model="x", voice="x", input=SHORT, extra_body={"reference_audio": huge}), 413, "too large")

    wrong_key = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    body = expect_error(lambda: wrong_key.audio.speech.create(model="x", voice="ryan", input=SHORT), 401, "API key")
    assert body["code"] == "invalid_api_key"

    assert len(speech(model="x", voice="ryan", input=SHORT, response_format="wav").content) > 0


def test_models_voices_and_health(client, server):
    import requests

    assert [m.id for m in client.models.list().data] == ["qwen3-tts"]
    base = f"http://127.0.0.1:{server.http.port}"
    voices = requests.get(f"{base}/v1/audio/voices", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert "Ryan" in voices["voices"] and voices["uploaded_voices"] == []
    assert requests.get(f"{base}/v1/audio/voices", timeout=10).status_code == 401
    health = requests.get(f"{base}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_the_http_api_listens_on_loopback_unless_configured():
    settings = Settings.from_args(["--http-port", "10201"], {})
    assert settings.http.port == 10201 and settings.http.host == "127.0.0.1"
    assert Settings.from_args([], {}).http is None
    opened = Settings.from_args(["--http-port", "8000", "--http-host", "0.0.0.0", "--http-api-key", "k"], {})
    assert opened.http.host == "0.0.0.0" and opened.http.api_key == "k"


def test_concurrent_http_and_parallel_requests_share_the_engine(client):
    results: list[int] = []

    def one(voice):
        results.append(len(client.audio.speech.create(model="x", voice=voice, input=SHORT, response_format="pcm").content))

    threads = [threading.Thread(target=one, args=(v,)) for v in ("ryan", "vivian", "aiden", "sohee")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 4 and all(size > 0 for size in results)
