"""One Wyoming client connection: events in, PCM audio out.

The read loop never waits for synthesis: audio is forwarded by a task of its own, so `describe`
is answered at once, streamed text is taken in while earlier sentences are spoken, and a client
that goes away is noticed (and its work cancelled) immediately.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from ..request import RequestError, SpeechRequests, TextStream
from ..speech import AUDIO_FORMAT, JobCancelled, SpeechJob
from ..voices import Voice
from .events import EventLimits, ProtocolError, read_event
from .info import PROGRAM_NAME, build_info

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandlerConfig:
    """What every connection shares."""

    requests: SpeechRequests
    streaming: bool = True  # advertise streaming synthesis
    limits: EventLimits = EventLimits()

    @property
    def info(self) -> Info:
        # Built per describe: the catalog may change (a remote that answers late).
        return build_info(self.requests.catalog, streaming=self.streaming)


class TtsEventHandler(AsyncEventHandler):
    """Serves one client."""

    def __init__(self, config: HandlerConfig, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.config = config
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "client")
        self._stream: TextStream | None = None
        self._speaking: asyncio.Task | None = None
        self._warned_types: set[str] = set()

    async def run(self) -> None:
        """Read events until the client leaves or breaks the protocol."""
        try:
            while True:
                try:
                    event = await read_event(self.reader, self.config.limits)
                except ProtocolError as err:
                    await self._drop(str(err))
                    break
                if event is None:
                    break
                try:
                    keep_open = await self.handle_event(event)
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    problem = f"no {err.args[0]!r} field" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
                    await self._drop(f"malformed '{event.type}' event ({problem})")
                    break
                if not keep_open:
                    break
        except ConnectionError:
            pass
        finally:
            await self.disconnect()
            self.writer.close()

    async def _drop(self, reason: str) -> None:
        """Log why the connection ends, and tell the client before closing it."""
        _LOGGER.warning("Dropping %s: %s", self.peer, reason)
        try:
            await self.write_event(Error(text=f"Closing the connection: {reason}", code="malformed-event").event())
        except ConnectionError:
            pass  # it left already

    async def disconnect(self) -> None:
        if self._stream is not None:
            self._stream.job.cancel()
            self._stream = None
        if self._speaking is not None and not self._speaking.done():
            self._speaking.cancel()

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(self.config.info.event())
            return True
        if Synthesize.is_type(event.type):
            if self._stream is not None:
                return True  # Home Assistant repeats the streamed text for old servers
            return await self._synthesize(Synthesize.from_event(event))
        if SynthesizeStart.is_type(event.type):
            return await self._start_stream(SynthesizeStart.from_event(event))
        if SynthesizeChunk.is_type(event.type):
            return await self._stream_text(SynthesizeChunk.from_event(event).text)
        if SynthesizeStop.is_type(event.type):
            return await self._stop_stream()
        if Ping.is_type(event.type):
            await self.write_event(Pong(text=Ping.from_event(event).text).event())
            return True
        if event.type == "select-program" and event.data.get("name") in (None, PROGRAM_NAME):
            return True
        if event.type not in self._warned_types:
            # The Wyoming protocol has servers skip events they do not know.
            self._warned_types.add(event.type)
            _LOGGER.warning("Ignoring event '%s' from %s: this server does not handle it", event.type, self.peer)
        return True

    # Requests

    async def _refuse(self, text: str, code: str) -> bool:
        """Send an error and close: Home Assistant would otherwise wait for audio forever."""
        _LOGGER.warning("Refusing request from %s: %s", self.peer, text)
        await self.write_event(Error(text=text, code=code).event())
        return False

    async def _open(self, requested, text: str | None = None) -> tuple[SpeechJob, Voice, TextStream | None] | None:
        """A job for a synthesize (with its text) or a stream (without); None after a refusal."""
        requests = self.config.requests
        try:
            voice = requests.voice(None if requested is None else (requested.name or requested.speaker))
            if text is not None:
                return requests.speak(text, voice), voice, None
            stream = requests.open_stream(voice)
            return stream.job, voice, stream
        except RequestError as err:
            await self._refuse(err.message, err.code)
            return None

    async def _synthesize(self, synthesize: Synthesize) -> bool:
        opened = await self._open(synthesize.voice, synthesize.text)
        if opened is None:
            return False
        job, voice, _stream = opened
        self._speak(job, voice, streaming=False)
        return True

    async def _start_stream(self, start: SynthesizeStart) -> bool:
        if self._stream is not None:
            return await self._refuse("synthesize-start while a text stream is already open", "protocol")
        opened = await self._open(start.voice)
        if opened is None:
            return False
        job, voice, self._stream = opened
        self._speak(job, voice, streaming=True)
        return True

    async def _stream_text(self, text: str) -> bool:
        if self._stream is None:
            _LOGGER.warning("Ignoring synthesize-chunk from %s outside a text stream", self.peer)
            return True
        try:
            self._stream.feed(text)
        except RequestError as err:
            return await self._refuse(err.message, err.code)
        return True

    async def _stop_stream(self) -> bool:
        stream = self._stream
        if stream is None:
            await self.write_event(SynthesizeStopped().event())
            return True
        stream.end()
        self._stream = None
        return True

    # Audio

    def _speak(self, job: SpeechJob, voice: Voice, streaming: bool) -> None:
        """Forward the job's audio after whatever this connection is already sending."""
        previous = self._speaking
        self._speaking = asyncio.create_task(self._forward(job, voice, streaming, previous))

    async def _forward(self, job: SpeechJob, voice: Voice, streaming: bool, previous: asyncio.Task | None) -> None:
        try:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            # A stream sends audio-start with its first audio, so an empty stream has no cycle.
            cycle_open = not streaming
            if cycle_open:
                await self.write_event(AudioStart(**AUDIO_FORMAT).event())
            async for chunk in job:
                if not cycle_open:
                    await self.write_event(AudioStart(**AUDIO_FORMAT).event())
                    cycle_open = True
                await self.write_event(AudioChunk(audio=chunk.pcm, **AUDIO_FORMAT).event())
            if cycle_open:
                await self.write_event(AudioStop().event())
            if streaming:
                await self.write_event(SynthesizeStopped().event())
            self._log_request(job, voice)
        except (JobCancelled, asyncio.CancelledError):
            job.cancel()
        except ConnectionError:
            job.cancel()
            _LOGGER.info("%s left while audio was being sent", self.peer)
        except Exception as err:  # noqa: BLE001 - report it to the client and the log
            job.cancel()
            _LOGGER.exception("Synthesis for %s failed", self.peer)
            try:
                await self.write_event(Error(text=f"Synthesis failed: {err}", code="synthesis-failed").event())
            finally:
                self.writer.close()

    def _log_request(self, job: SpeechJob, voice: Voice) -> None:
        stats = job.stats
        first = stats.time_to_first_audio
        rtf = stats.real_time_factor
        _LOGGER.info(
            "Spoke to %s: voice=%s chars=%d segments=%d first_audio=%s audio=%.2fs speed=%s",
            self.peer,
            voice.name,
            stats.characters,
            stats.segments,
            "-" if first is None else f"{first * 1000:.0f}ms",
            stats.audio_seconds,
            "-" if rtf is None else f"{rtf:.2f}x real time",
        )
