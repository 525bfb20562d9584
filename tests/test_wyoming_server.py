"""The Wyoming server over real TCP, with the `wyoming` client, on a tiny checkpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time

import numpy as np
import pytest
from wyoming.audio import AudioChunk, AudioStart
from wyoming.error import Error
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Describe, Info
from wyoming.ping import Ping
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from helpers import ServerThread, is_one_audio_cycle, read_until

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.engine.options import EngineOptions, StopRules
from wyoming_qwen3tts.http_api.app import HttpApiOptions
from wyoming_qwen3tts.remote.engine import RemoteOptions
from wyoming_qwen3tts.request import RequestLayerOptions
from wyoming_qwen3tts.settings import Settings
from wyoming_qwen3tts.speech import RequestOptions, SamplingOptions

# Random weights never stop by themselves: short caps keep every request quick and its length
# predictable (greedy decoding makes it deterministic).
STOP = StopRules(base_frames=4, frames_per_token=0.25, max_frames=60)
SETTINGS = Settings(requests=RequestLayerOptions(defaults=RequestOptions(sampling=SamplingOptions().greedy())))
BYTES_PER_FRAME = 1920 * 2


@pytest.fixture(scope="module")
def local_engine(checkpoints):
    engine = SpeechEngine.load(EngineOptions(model=str(checkpoints["custom_voice"]), stop=STOP))
    yield engine
    engine.close()


@dataclasses.dataclass
class Stack:
    server: ServerThread  # what Wyoming clients talk to
    engines: list  # every engine doing work for it (front first)
    remote: bool


@pytest.fixture(scope="module", params=["local", "remote"])
def stack(request, local_engine):
    """The server with the local engine, or a front whose remote engine is a second instance."""
    if request.param == "local":
        server = ServerThread(SETTINGS, local_engine)
        yield Stack(server, [local_engine], remote=False)
        server.stop()
        return
    backend = ServerThread(dataclasses.replace(SETTINGS, http=HttpApiOptions(port=0)), local_engine)
    front = ServerThread(dataclasses.replace(SETTINGS, remote=RemoteOptions(urls=(backend.http_url,))))
    yield Stack(front, [front.engine, local_engine], remote=True)
    front.stop()
    backend.stop()


@pytest.fixture
def server(stack):
    return stack.server


async def describe(server) -> Info:
    async with server.client() as client:
        await client.write_event(Describe().event())
        cycle = await read_until(client, "info", timeout=10)
    return Info.from_event(cycle.events[-1])


async def synthesize(server, text: str, voice: str | None = "Ryan", timeout: float = 120):
    async with server.client() as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice) if voice else None).event())
        return await read_until(client, "audio-stop", timeout)


async def wait_for_idle(engines, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(engine.active_jobs == 0 for engine in engines):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_describe_lists_one_tts_program_with_the_checkpoint_speakers(server):
    info = await describe(server)
    assert len(info.tts) == 1
    program = info.tts[0]
    assert program.name == "qwen3-tts"
    assert program.attribution.name == "Qwen" and program.attribution.url.startswith("https://")
    assert program.installed and program.version
    assert program.supports_synthesize_streaming
    voices = {voice.name: voice for voice in program.voices}
    assert len(voices) == 9
    assert voices["Ryan"].description == "Ryan — English"
    assert voices["Dylan"].description == "Dylan — Beijing dialect"
    assert voices["Ryan"].languages[0] == "en" and voices["Sohee"].languages[0] == "ko"
    assert set(voices["Ryan"].languages) >= {"en", "zh", "de", "fr", "ja"}


async def test_synthesize_streams_one_cycle_that_starts_before_generation_ends(server, stack):
    text = "Hello there. The lights are on in the kitchen. It will rain tonight."
    async with server.client() as client:
        started = time.monotonic()
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name="ryan")).event())
        events, first_chunk_at = [], None
        while True:
            event = await client.read_event()
            events.append(event)
            if AudioChunk.is_type(event.type) and first_chunk_at is None:
                first_chunk_at = time.monotonic() - started
            if event.type == "audio-stop":
                break
        total = time.monotonic() - started
    types = [e.type for e in events]
    assert is_one_audio_cycle(types)
    start = AudioStart.from_event(events[0])
    chunks = [AudioChunk.from_event(e) for e in events if AudioChunk.is_type(e.type)]
    assert {(c.rate, c.width, c.channels) for c in chunks} == {(start.rate, start.width, start.channels)} == {(24000, 2, 1)}
    # The first chunk is a single 80 ms frame (a remote engine may receive it merged with more).
    assert len(chunks[0].audio) <= (3 if stack.remote else 1) * BYTES_PER_FRAME
    assert len(chunks) > 3
    assert first_chunk_at < total / 2, (first_chunk_at, total)
    pcm = np.frombuffer(b"".join(c.audio for c in chunks), dtype="<i2")
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 300, "audible, not silence"


async def test_voice_names_match_in_any_case_and_none_means_the_default(server):
    lower = await synthesize(server, "Hello.", voice="uncle_fu")
    upper = await synthesize(server, "Hello.", voice="UNCLE_FU")
    default = await synthesize(server, "Hello.", voice=None)
    serena = await synthesize(server, "Hello.", voice="Serena")  # the default: first speaker
    assert lower.audio == upper.audio
    assert default.audio == serena.audio != lower.audio


async def test_unknown_voice_gets_an_error_listing_the_voices_then_the_connection_closes(server):
    async with server.client() as client:
        await client.write_event(Synthesize(text="Hello.", voice=SynthesizeVoice(name="Nobody")).event())
        cycle = await read_until(client, "audio-stop", timeout=10)
        assert cycle.types == ["error"]
        error = Error.from_event(cycle.events[0])
        assert "Nobody" in error.text and "Ryan" in error.text and "Uncle_Fu" in error.text
        assert await client.read_event() is None, "the server closes the connection after the error"


@pytest.mark.parametrize("text", ["", "   \n\t "])
async def test_empty_text_gives_an_empty_audio_cycle(server, text):
    cycle = await synthesize(server, text)
    assert cycle.types == ["audio-start", "audio-stop"]


async def test_streaming_start_then_stop_without_text_only_reports_stopped(server):
    async with server.client() as client:
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="Ryan")).event())
        await client.write_event(SynthesizeStop().event())
        cycle = await read_until(client, "synthesize-stopped", timeout=10)
    assert cycle.types == ["synthesize-stopped"]


async def test_streamed_sentences_are_spoken_while_more_text_is_coming(server):
    async with server.client() as client:
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="Aiden")).event())
        await client.write_event(SynthesizeChunk(text="Good morning, the kitchen ").event())
        await client.write_event(SynthesizeChunk(text="lights are on. Now ").event())
        # The first sentence is complete; its audio must come while the stream is still open.
        first = await asyncio.wait_for(client.read_event(), timeout=30)
        assert first.type == "audio-start"
        chunk = await asyncio.wait_for(client.read_event(), timeout=30)
        assert chunk.type == "audio-chunk"
        await asyncio.sleep(0.5)
        await client.write_event(SynthesizeChunk(text="I will set a timer.").event())
        await client.write_event(SynthesizeStop().event())
        rest = await read_until(client, "synthesize-stopped")
    types = ["audio-start", "audio-chunk"] + rest.types
    assert is_one_audio_cycle(types[:-1]) and types[-1] == "synthesize-stopped"


async def stream(server, pieces: list[str], compat_text: str | None) -> bytes:
    """Home Assistant's streaming sequence; with ``compat_text`` it adds its full synthesize."""
    async with server.client() as client:
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="Ryan")).event())
        for piece in pieces:
            await client.write_event(SynthesizeChunk(text=piece).event())
        if compat_text is not None:
            await client.write_event(Synthesize(text=compat_text, voice=SynthesizeVoice(name="Ryan")).event())
        await client.write_event(SynthesizeStop().event())
        cycle = await read_until(client, "synthesize-stopped")
    assert cycle.types[-1] == "synthesize-stopped"
    assert is_one_audio_cycle(cycle.types[:-1])
    return cycle.audio


async def test_home_assistant_streaming_sequence_speaks_the_text_once(server):
    pieces = ["Hello there. ", "The weather is ", "nice today."]
    with_compat = await stream(server, pieces, compat_text="".join(pieces))
    without = await stream(server, pieces, compat_text=None)
    assert len(without) > 0
    assert with_compat == without, "the full synthesize inside the stream must not be spoken again"


async def test_a_5000_character_text_is_spoken_in_one_cycle(server):
    sentence = "The garden lights turn on at sunset and the heating goes down at ten. "
    text = (sentence * (5000 // len(sentence) + 1))[:5000]
    # About 930 frames and 290 chunks; on our 2-core VMs 45-52 s in a full run on a quiet day,
    # 110-116 s alone on a slow one (the tiny model's int8 steps wait for the interpreter lock
    # beside the decoding thread), over 120 s in a full run on a slow one.
    cycle = await synthesize(server, text, timeout=600)
    assert is_one_audio_cycle(cycle.types)
    sentences = text.count(".")
    assert len(cycle.audio) >= sentences * STOP.base_frames * BYTES_PER_FRAME


async def test_a_client_that_vanishes_mid_stream_has_its_work_cancelled(server, stack):
    text = "Hello there. " * 40
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await async_write_event(Synthesize(text=text, voice=SynthesizeVoice(name="Ryan")).event(), writer)
    await reader.readline()  # audio-start arrives: the job is running
    writer.close()
    assert await wait_for_idle(stack.engines, 5), "the job should stop once the client is gone"
    assert (await synthesize(server, "Still here?")).types[0] == "audio-start"


async def test_eight_concurrent_clients_all_get_their_audio_while_describe_answers_at_once(stack):
    server, model_engine = stack.server, stack.engines[-1]
    steps: list[tuple[float, int]] = []  # (when, rows) of every step of the engine that runs the model
    listener = lambda ids: steps.append((time.monotonic(), len(ids)))  # noqa: E731
    model_engine.worker.step_listeners.append(listener)
    try:
        # About 50 frames each: long enough to ask while they are being generated.
        texts = [f"Client number {i} says: " + "the lights in the living room are on. " * 12 for i in range(8)]
        tasks = [asyncio.create_task(synthesize(server, text)) for text in texts]
        for _ in range(500):
            if any(rows >= 4 for _when, rows in steps):
                break
            await asyncio.sleep(0.01)
        latencies = []
        for _ in range(5):
            started = time.monotonic()
            info = await describe(server)
            latencies.append(time.monotonic() - started)
        asked_until = time.monotonic()
        cycles = await asyncio.gather(*tasks)
    finally:
        model_engine.worker.step_listeners.remove(listener)
    assert info.tts[0].name == "qwen3-tts"
    assert any(rows >= 4 for _when, rows in steps), "the streams should share steps"
    assert any(when > asked_until and rows >= 2 for when, rows in steps), "describe was asked while a batch ran"
    assert statistics.median(latencies) < 0.1, f"describe took {latencies} s while 8 syntheses ran"
    for text, cycle in zip(texts, cycles):
        assert is_one_audio_cycle(cycle.types)
        alone = await synthesize(server, text)
        assert len(cycle.audio) == len(alone.audio) > 0, "each client gets all its audio, as when alone"


async def test_a_long_request_does_not_starve_a_short_one(server):
    long_text = " ".join(f"This is sentence number {i} of a long story." for i in range(12))
    finished: dict[str, float] = {}
    started = time.monotonic()

    async def timed(name, text):
        cycle = await synthesize(server, text)
        finished[name] = time.monotonic() - started
        return cycle

    long_task = asyncio.create_task(timed("long", long_text))
    await asyncio.sleep(0.5)
    short_started = time.monotonic() - started
    await timed("short", "Yes.")
    await long_task
    assert finished["short"] < finished["long"]
    assert finished["short"] - short_started < (finished["long"] - short_started) / 2


@pytest.mark.parametrize(
    "garbage",
    [
        bytes(range(256)) * 8,
        b"this is not json\n",
        b"[1, 2, 3]\n",
        b'{"data": {"text": "no type"}}\n',
        b'{"type": "synthesize", "data": "a string"}\n',
        b'{"type": "synthesize", "data_length": 99999999999}\n',
        b'{"type": "synthesize", "payload_length": -5}\n',
        b'{"type": "synthesize", "data_length": 5}\n[1,2]',
        b'{"type": "synthesize", "data": {"voice": {"name": "Ryan"}}}\n',
        b"{" + b"x" * 100_000 + b"\n",
    ],
    ids=["random-bytes", "not-json", "array-header", "no-type", "data-not-object", "absurd-data-length",
         "negative-payload-length", "data-not-object-in-body", "synthesize-without-text", "endless-header"],
)
async def test_malformed_input_gets_an_error_and_drops_that_connection_and_the_server_keeps_serving(server, garbage, caplog):
    caplog.set_level("WARNING")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(garbage)
    await writer.drain()
    # The server says why in one error event, then closes the connection.
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    events = asyncio.StreamReader()
    events.feed_data(answer)
    events.feed_eof()
    event = await async_read_event(events)
    assert event is not None and Error.is_type(event.type)
    error = Error.from_event(event)
    assert error.code == "malformed-event"
    assert await async_read_event(events) is None, "nothing after the error"
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Dropping 127.0.0.1")]
    assert len(logged) == 1 and logged[0].split(": ", 1)[1] in error.text, "the client hears what the log says"
    info = await describe(server)
    assert info.tts[0].name == "qwen3-tts"


async def test_unknown_events_are_skipped_and_ping_is_answered(server):
    async with server.client() as client:
        await client.write_event(Event(type="something-new", data={"x": 1}))
        await client.write_event(Ping(text="hi").event())
        cycle = await read_until(client, "pong", timeout=10)
        assert cycle.types == ["pong"]
        await client.write_event(Describe().event())
        assert (await read_until(client, "info", timeout=10)).types == ["info"]


async def test_text_over_the_limit_is_refused(local_engine):
    server = ServerThread(dataclasses.replace(SETTINGS, requests=dataclasses.replace(SETTINGS.requests, max_text_chars=50)), local_engine)
    try:
        async with server.client() as client:
            await client.write_event(Synthesize(text="x" * 51).event())
            cycle = await read_until(client, "audio-stop", timeout=10)
        assert cycle.types == ["error"] and "limit of 50" in Error.from_event(cycle.events[0]).text
    finally:
        server.stop()
