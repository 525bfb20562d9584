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

from ..engine.engine import RequestOptions, SpeechEngine
from ..engine.utterance import CHANNELS, SAMPLE_RATE, SAMPLE_WIDTH
from ..engine.worker import JobCancelled, SynthesisJob
from ..text import TextSegmenter, WordStreamSegmenter, split_text
from ..voices import Voice, VoiceCatalog
from .events import EventLimits, ProtocolError, read_event
from .info import PROGRAM_NAME

_LOGGER = logging.getLogger(__name__)

AUDIO_FORMAT = {"rate": SAMPLE_RATE, "width": SAMPLE_WIDTH, "channels": CHANNELS}


@dataclass(frozen=True)
class HandlerConfig:
    """What every connection shares."""

    engine: SpeechEngine
    catalog: VoiceCatalog
    info: Info
    max_text_chars: int = 20_000
    limits: EventLimits = EventLimits()
    request: RequestOptions = RequestOptions()
    stream_text_by: str = "words"  # streamed text enters the model: "words" (dual track) or "sentences"


@dataclass
class _TextStream:
    """A streaming synthesis in progress (synthesize-start .. synthesize-stop)."""

    job: SynthesisJob
    segmenter: TextSegmenter | WordStreamSegmenter
    chars: int = 0

    def feed(self, text: str) -> None:
        self._apply(self.segmenter.add(text))

    def end(self) -> None:
        self._apply(self.segmenter.finish())
        self.job.finish()

    def _apply(self, output) -> None:
        if isinstance(self.segmenter, WordStreamSegmenter):
            for piece, close in output:
                if piece:
                    self.job.append_text(piece)
                if close:
                    self.job.close_segment()
        else:
            for segment in output:
                self.job.add_text(segment)


class TtsEventHandler(AsyncEventHandler):
    """Serves one client."""

    def __init__(self, config: HandlerConfig, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.config = config
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "client")
        self._stream: _TextStream | None = None
        self._speaking: asyncio.Task | None = None
        self._warned_types: set[str] = set()

    async def run(self) -> None:
        """Read events until the client leaves or breaks the protocol."""
        try:
            while True:
                try:
                    event = await read_event(self.reader, self.config.limits)
                except ProtocolError as err:
                    _LOGGER.warning("Dropping %s: %s", self.peer, err)
                    break
                if event is None:
                    break
                try:
                    keep_open = await self.handle_event(event)
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    _LOGGER.warning("Dropping %s: malformed '%s' event (%s: %s)", self.peer, event.type, type(err).__name__, err)
                    break
                if not keep_open:
                    break
        except ConnectionError:
            pass
        finally:
            await self.disconnect()
            self.writer.close()

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

    async def _voice(self, requested) -> Voice | None:
        name = None if requested is None else (requested.name or requested.speaker)
        voice = self.config.catalog.find(name)
        if voice is None:
            await self._refuse(
                f"Unknown voice {name!r}. Available voices: {', '.join(self.config.catalog.names)}",
                "unknown-voice",
            )
        return voice

    def _start_job(self, voice: Voice) -> SynthesisJob:
        request = RequestOptions(
            language=voice.language,
            sampling=self.config.request.sampling,
            seed=self.config.request.seed,
            non_streaming_mode=self.config.request.non_streaming_mode,
        )
        return self.config.engine.start(voice.spec, request)

    def _too_long(self, chars: int) -> bool:
        return chars > self.config.max_text_chars

    async def _synthesize(self, synthesize: Synthesize) -> bool:
        voice = await self._voice(synthesize.voice)
        if voice is None:
            return False
        if self._too_long(len(synthesize.text)):
            return await self._refuse(
                f"Text of {len(synthesize.text)} characters is over the limit of {self.config.max_text_chars}",
                "text-too-long",
            )
        job = self._start_job(voice)
        for segment in split_text(synthesize.text):
            job.add_text(segment)
        job.finish()
        self._speak(job, voice, streaming=False)
        return True

    async def _start_stream(self, start: SynthesizeStart) -> bool:
        if self._stream is not None:
            return await self._refuse("synthesize-start while a text stream is already open", "protocol")
        voice = await self._voice(start.voice)
        if voice is None:
            return False
        job = self._start_job(voice)
        by_words = self.config.stream_text_by == "words" and self.config.engine.streams_text(voice.spec)
        self._stream = _TextStream(job=job, segmenter=WordStreamSegmenter() if by_words else TextSegmenter())
        self._speak(job, voice, streaming=True)
        return True

    async def _stream_text(self, text: str) -> bool:
        stream = self._stream
        if stream is None:
            _LOGGER.warning("Ignoring synthesize-chunk from %s outside a text stream", self.peer)
            return True
        stream.chars += len(text)
        if self._too_long(stream.chars):
            return await self._refuse(
                f"Streamed text is over the limit of {self.config.max_text_chars} characters", "text-too-long"
            )
        stream.feed(text)
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

    def _speak(self, job: SynthesisJob, voice: Voice, streaming: bool) -> None:
        """Forward the job's audio after whatever this connection is already sending."""
        previous = self._speaking
        self._speaking = asyncio.create_task(self._forward(job, voice, streaming, previous))

    async def _forward(self, job: SynthesisJob, voice: Voice, streaming: bool, previous: asyncio.Task | None) -> None:
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

    def _log_request(self, job: SynthesisJob, voice: Voice) -> None:
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
