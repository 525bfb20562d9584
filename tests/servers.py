"""A Wyoming server on a tiny checkpoint, run in a background thread for tests.

Tests talk to it over real TCP on loopback, from their own event loops, exactly as Home
Assistant would; the thread only lets them peek at the engine (e.g. how many jobs run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading

from wyoming.audio import AudioChunk
from wyoming.client import AsyncTcpClient
from wyoming.event import Event

from wyoming_qwen3tts.engine.engine import SpeechEngine
from wyoming_qwen3tts.http_api.server import HttpApiServer
from wyoming_qwen3tts.server.app import WyomingTtsServer, build_catalog, clone_entries, prepare
from wyoming_qwen3tts.voices import VoiceCatalog
from wyoming_qwen3tts.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """Starts a WyomingTtsServer on its own loop; `stop()` shuts it down."""

    def __init__(self, settings: Settings, engine: SpeechEngine | None = None, catalog: VoiceCatalog | None = None) -> None:
        self.port = free_port()
        self.settings = dataclasses.replace(settings, uri=f"tcp://127.0.0.1:{self.port}")
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
            self.engine, catalog = await prepare(self.settings)
        else:
            catalog = self.catalog or await build_catalog(self.engine, self.settings, clone_entries(self.settings))
        self.server = WyomingTtsServer(self.settings, self.engine, catalog)
        await self.server.start()
        self.http = None
        if self.settings.http_port is not None:
            self.http = HttpApiServer(self.settings, self.engine, catalog)
            await self.http.start()
        self._started.set()
        await self._stop.wait()
        await self.server.stop()
        if self.http is not None:
            await self.http.stop()
        if owns_engine:
            await self.engine.aclose()

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


def is_one_audio_cycle(types: list[str]) -> bool:
    """audio-start, any number of audio-chunk, audio-stop: nothing else."""
    return (
        len(types) >= 2
        and types[0] == "audio-start"
        and types[-1] == "audio-stop"
        and all(t == "audio-chunk" for t in types[1:-1])
    )
