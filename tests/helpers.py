"""Helpers the tests share: servers in a thread, Wyoming cycles, the stock path's codes, samples.

`ServerThread` runs the product's edges on their own event loop in a background thread: tests
talk to them over real TCP on loopback, from their own event loops, exactly as Home Assistant
would; the thread only lets them peek at the backend (e.g. how many jobs run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading

import numpy as np
import torch
from wyoming.audio import AudioChunk
from wyoming.client import AsyncTcpClient
from wyoming.event import Event

from wyoming_qwen3tts.engine.prompt import build_prompt
from wyoming_qwen3tts.request import SpeechRequests
from wyoming_qwen3tts.serve import build_catalog, clone_entries, edges, prepare
from wyoming_qwen3tts.settings import Settings
from wyoming_qwen3tts.speech import PresetSpeaker, SpeechBackend
from wyoming_qwen3tts.voices import VoiceCatalog


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """Starts the Wyoming server (and the HTTP API, if configured) on its own loop; `stop()` ends it."""

    def __init__(self, settings: Settings, engine: SpeechBackend | None = None, catalog: VoiceCatalog | None = None) -> None:
        self.port = free_port()
        self.settings = dataclasses.replace(settings, wyoming=dataclasses.replace(settings.wyoming, uri=f"tcp://127.0.0.1:{self.port}"))
        self.engine = engine
        self.catalog = catalog
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("server did not start")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        owns_engine = self.engine is None
        if owns_engine:  # e.g. a remote engine, whose HTTP session must live on this loop
            self.requests = await prepare(self.settings)
            self.engine = self.requests.backend
        else:
            catalog = self.catalog or await build_catalog(self.engine, self.settings, clone_entries(self.settings))
            self.requests = SpeechRequests(self.engine, catalog, self.settings.requests)
        servers = edges(self.settings, self.requests)
        self.server = servers[0]
        self.http = servers[1] if len(servers) > 1 else None
        for server in servers:
            await server.start()
        self._started.set()
        await self._stop.wait()
        for server in servers:
            await server.stop()
        if owns_engine:
            await self.requests.aclose()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    def client(self) -> AsyncTcpClient:
        return AsyncTcpClient("127.0.0.1", self.port)


@dataclasses.dataclass
class Cycle:
    """What a client received for one request."""

    events: list[Event]

    @property
    def types(self) -> list[str]:
        return [e.type for e in self.events]

    @property
    def chunks(self) -> list[AudioChunk]:
        return [AudioChunk.from_event(e) for e in self.events if AudioChunk.is_type(e.type)]

    @property
    def audio(self) -> bytes:
        return b"".join(c.audio for c in self.chunks)


async def read_until(client: AsyncTcpClient, last_type: str, timeout: float = 120) -> Cycle:
    """Events up to and including the first of ``last_type`` (or an error, or the end)."""
    events: list[Event] = []
    async with asyncio.timeout(timeout):
        while True:
            event = await client.read_event()
            if event is None:
                return Cycle(events)
            events.append(event)
            if event.type in (last_type, "error"):
                return Cycle(events)


async def greedy_cycle_through_wyoming(engine, text: str = "Good morning.", voice: str = "Ryan") -> Cycle:
    """One greedy `synthesize` of ``text`` through a Wyoming server on ``engine``, which is closed after."""
    from wyoming.tts import Synthesize, SynthesizeVoice

    from wyoming_qwen3tts.request import RequestLayerOptions
    from wyoming_qwen3tts.speech import RequestOptions, SamplingOptions

    server = ServerThread(Settings(requests=RequestLayerOptions(defaults=RequestOptions(sampling=SamplingOptions().greedy()))), engine)
    try:
        async with server.client() as client:
            await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice)).event())
            return await read_until(client, "audio-stop", timeout=60)
    finally:
        server.stop()
        engine.close()


def loudest_sample(pcm: bytes) -> int:
    """The largest magnitude among 16-bit samples: silence or a broken codec gives next to nothing."""
    return int(np.abs(np.frombuffer(pcm, dtype="<i2").astype(np.int32)).max(initial=0))


def is_one_audio_cycle(types: list[str]) -> bool:
    """audio-start, any number of audio-chunk, audio-stop: nothing else."""
    return (
        len(types) >= 2
        and types[0] == "audio-start"
        and types[-1] == "audio-stop"
        and all(t == "audio-chunk" for t in types[1:-1])
    )


def voice_like_sample(seconds: float = 3.0, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-like test signal: harmonics with vibrato under a 4 Hz envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = 140 + 15 * np.sin(2 * np.pi * 5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t))
    noise = 0.02 * rng.standard_normal(t.shape)
    return (0.25 * voiced * envelope + noise).astype(np.float32)


# The stock package's codes, for equivalence tests.

TEXTS = [
    "Hello.",
    "Turn off the kitchen lights, please.",
    "It is twenty one degrees inside. Light rain is expected tonight! Shall I close the windows?",
]
MAX_NEW_TOKENS = 24  # the package then returns at most 23 frames


def official_codes_and_audio(wrapper, call, **kwargs):
    """Run an official generate_* call and capture the codes it decoded."""
    captured = {}
    original = wrapper.model.generate

    def capture(*args, **kw):
        codes, hidden = original(*args, **kw)
        captured["codes"] = codes[0]
        return codes, hidden

    wrapper.model.generate = capture
    try:
        wavs, sample_rate = call(**kwargs)
    finally:
        wrapper.model.generate = original
    assert sample_rate == 24000
    return captured["codes"], wavs[0]


def official_greedy_codes_and_audio(wrapper, call, **kwargs):
    """`official_codes_and_audio` with sampling off for both stages."""
    return official_codes_and_audio(wrapper, call, do_sample=False, subtalker_dosample=False, **kwargs)


class CodeRecorder:
    """Collects the codes behind each job's audio, through the engine's public frame hook."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.codes: dict[int, list[torch.Tensor]] = {}
        self.frames = 0

    def __enter__(self) -> "CodeRecorder":
        self.engine.worker.frame_listeners.append(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self.engine.worker.frame_listeners.remove(self._record)

    def _record(self, job_id: int, chunk) -> None:
        self.codes.setdefault(job_id, []).append(chunk.codes.cpu())
        self.frames += chunk.codes.shape[0]

    def of(self, job) -> torch.Tensor:
        return torch.cat(self.codes[job.id])


def official_seeded_codes(wrapper, text, speaker, seed):
    """The stock path's codes with the checkpoint's sampling defaults from ``seed``, and our prompt."""
    torch.manual_seed(seed)
    official, _wav = official_codes_and_audio(
        wrapper, wrapper.generate_custom_voice, text=text, speaker=speaker, language="english", max_new_tokens=MAX_NEW_TOKENS
    )
    return official, build_prompt(wrapper, text, PresetSpeaker(speaker), "english", non_streaming_mode=True)


def advance(runtime, utterance):
    """One step of an utterance alone: its decoded chunk and that chunk's codes [frames, 16], or (None, None)."""
    frames = runtime.advance(utterance)
    if frames is None:
        return None, None
    return runtime.decode(utterance, frames), frames.codes


def drain(runtime, utterance):
    """Run an utterance to its end: its audio chunks and all its codes."""
    chunks, codes = [], []
    while not utterance.finished:
        chunk, frames = advance(runtime, utterance)
        if chunk is not None:
            chunks.append(chunk)
            codes.append(frames)
    return chunks, torch.cat(codes) if codes else torch.zeros(0, 16, dtype=torch.long)


def generate_rows(generator, prompts, samplings, frames: int) -> list[torch.Tensor]:
    """Each prompt's codes [frames, 16], all of them stepped together in batched steps of a `FrameGenerator`."""
    states = [generator.prefill(p, s, frames) for p, s in zip(prompts, samplings)]
    codes = [[] for _ in states]
    while not all(state.finished for state in states):
        for row, frame in zip(codes, generator.step(states)):
            if frame is not None:
                row.append(frame)
    return [torch.stack(row) for row in codes]


def greedy_frames(wrapper, frames: int) -> torch.Tensor:
    """Codes [frames, 16] of one greedy sentence in Ryan's voice, stepped alone by a `FrameGenerator`."""
    from wyoming_qwen3tts.engine.generate import FrameGenerator
    from wyoming_qwen3tts.speech import SamplingOptions

    prompt = build_prompt(wrapper, "Good night, sleep well.", PresetSpeaker("ryan"), "english")
    return generate_rows(FrameGenerator(wrapper.model), [prompt], [SamplingOptions().greedy()], frames)[0]
