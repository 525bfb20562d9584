"""Wyoming clients for the benchmarks: the requests Home Assistant sends, timed on its side.

A benchmark runs them on its own event loop (``asyncio.run(one_stream(port, voice))``) or, the way
Home Assistant reaches the server, in a Python process of their own (`in_own_process`): there they
do not share the server's interpreter lock, which on a small model's step, all Python, costs the
server more than the streams themselves (BENCHMARKS.md, "How to read": clients in a process of
their own). This module imports no torch, so that process starts in a fraction of a second:

    python benchmarks/wyoming_clients.py PORT burst COUNT    # COUNT streams at once, as JSON
    python benchmarks/wyoming_clients.py PORT newcomer       # first audio of a 4th stream, as JSON
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from wyoming.audio import AudioChunk
from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

# One sentence: both paths generate it as one utterance.
TEXT = (
    "Good evening, the living room lights are dimmed, the front door is locked and the "
    "heating will keep the house at twenty one degrees until tomorrow morning."
)
FRAME_SECONDS = 0.08


@dataclass
class StreamResult:
    first_audio: float  # seconds from synthesize to the first audio chunk
    total: float
    audio_seconds: float
    started: float = 0.0  # perf_counter at the synthesize event
    ended: float = 0.0

    @property
    def frames_per_second(self) -> float:
        return self.audio_seconds / FRAME_SECONDS / self.total


@dataclass
class BurstResult:
    """Several streams started together."""

    streams: list[StreamResult]

    @property
    def aggregate_frames_per_second(self) -> float:
        wall = max(r.ended for r in self.streams) - min(r.started for r in self.streams)
        return sum(r.audio_seconds for r in self.streams) / FRAME_SECONDS / wall

    @property
    def wall(self) -> float:
        return max(r.ended for r in self.streams) - min(r.started for r in self.streams)


async def one_stream(port: int, voice: str, first_audio: asyncio.Event | None = None) -> StreamResult:

    async with AsyncTcpClient("127.0.0.1", port) as client:
        started = time.perf_counter()
        await client.write_event(Synthesize(text=TEXT, voice=SynthesizeVoice(name=voice)).event())
        first, samples = None, 0
        while True:
            event = await client.read_event()
            if event is None or event.type == "error":
                raise RuntimeError(f"synthesis failed: {event}")
            if AudioChunk.is_type(event.type):
                if first is None:
                    first = time.perf_counter() - started
                    if first_audio is not None:
                        first_audio.set()
                samples += len(event.payload) // 2
            if event.type == "audio-stop":
                break
        ended = time.perf_counter()
        return StreamResult(first_audio=first, total=ended - started, audio_seconds=samples / 24000, started=started, ended=ended)


async def one_streamed(port: int, voice: str) -> float:
    """First audio (seconds) the way Home Assistant streams a reply: synthesize-start, the text in
    one chunk, the full `synthesize` it adds for older servers, synthesize-stop; timed from the
    chunk. The server feeds streamed text into the model word by word (dual track)."""

    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name=voice)).event())
        started = time.perf_counter()
        await client.write_event(SynthesizeChunk(text=TEXT).event())
        await client.write_event(Synthesize(text=TEXT, voice=SynthesizeVoice(name=voice)).event())
        await client.write_event(SynthesizeStop().event())
        first = None
        while True:
            event = await client.read_event()
            if event is None or event.type == "error":
                raise RuntimeError(f"streamed synthesis failed: {event}")
            if first is None and AudioChunk.is_type(event.type):
                first = time.perf_counter() - started
            if event.type == "synthesize-stopped":
                return first


VOICES = ["Ryan", "Vivian", "Aiden", "Serena", "Sohee", "Eric", "Dylan", "Uncle_Fu"]


async def concurrent_streams(port: int, count: int) -> BurstResult:
    return BurstResult(list(await asyncio.gather(*(one_stream(port, VOICES[i % len(VOICES)]) for i in range(count)))))


async def newcomer_first_audio(port: int, running: int = 3) -> float:
    """First audio of a request that arrives once ``running`` others stream."""
    started = [asyncio.Event() for _ in range(running)]
    others = [asyncio.create_task(one_stream(port, VOICES[i], started[i])) for i in range(running)]
    for event in started:
        await event.wait()
    newcomer = await one_stream(port, VOICES[running])
    await asyncio.gather(*others)
    return newcomer.first_audio


def in_own_process(port: int, measurement: str, count: int = 1, timeout: float = 3600) -> "BurstResult | float":
    """``measurement`` ("burst" of ``count`` streams, or "newcomer") run by a fresh Python process."""
    done = subprocess.run(
        [sys.executable, __file__, str(port), measurement, str(count)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the client process failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout)
    if measurement == "newcomer":
        return float(result)
    return BurstResult([StreamResult(**stream) for stream in result])


def main(argv: list[str]) -> int:
    port, measurement = int(argv[0]), argv[1]
    if measurement == "burst":
        burst = asyncio.run(concurrent_streams(port, int(argv[2]) if len(argv) > 2 else 1))
        print(json.dumps([asdict(stream) for stream in burst.streams]))
    elif measurement == "newcomer":
        print(json.dumps(asyncio.run(newcomer_first_audio(port))))
    else:
        print(f"unknown measurement {measurement!r} (burst, newcomer)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
