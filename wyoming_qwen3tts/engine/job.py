"""One request in the engine: its text segments in, its audio chunks out, and its life cycle.

The event loop adds text and reads chunks; the engine worker's model thread moves the job along
(new segments, prefill, steps, its end); the decode thread delivers its audio. All three meet
under the worker's lock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from threading import Condition
from typing import TYPE_CHECKING, Callable, Protocol

from ..speech import AudioChunk, JobCancelled, JobStats
from .text_feed import TextFeed
from .utterance import CodeChunk, Utterance

if TYPE_CHECKING:
    from .runtime import ModelRuntime

_LOGGER = logging.getLogger(__name__)


class JobHost(Protocol):
    """What a job needs of the worker that runs it (`worker.EngineWorker`)."""

    condition: Condition  # guards every job's state
    frame_listeners: list[Callable[[int, CodeChunk], None]]

    def after_decoding(self, job: "SynthesisJob", work: Callable[[], None]) -> None: ...


class JobDone:
    """End-of-stream marker on a job's queue."""


# Builds the utterance for one segment (its text, or the feed it streams in through) and its
# index; runs on the worker thread (building a prompt touches the model).
UtteranceFactory = Callable[[str | TextFeed, int], Utterance]


class SynthesisJob:
    """One request: text segments in (possibly while it runs), audio chunks out."""

    _ids = itertools.count(1)

    def __init__(
        self,
        worker: JobHost,
        runtime: "ModelRuntime",
        make_utterance: UtteranceFactory,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.id = next(self._ids)
        self.runtime = runtime  # the model this job's voice belongs to: rows batch per model
        self._worker = worker
        self._make_utterance = make_utterance
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._segments: deque[str | TextFeed] = deque()
        self._open: TextFeed | None = None  # the segment text is streaming into
        self._segment_count = 0
        self._closed = False
        self._cancelled = False
        self._done = False
        self._failure: BaseException | None = None  # a decode failed: end the job with it
        self._starting: tuple[str | TextFeed, int] | None = None  # a segment whose utterance is not built yet
        self.current: Utterance | None = None
        self.stats = JobStats()

    # Called from the event loop.

    def add_text(self, text: str) -> None:
        """Queue one segment (normally a sentence) for synthesis; blank text is skipped."""
        if not text.strip():
            return
        with self._worker.condition:
            if self._closed:
                raise RuntimeError("add_text() after finish()")
            self._close_open_segment()
            self._segments.append(text)
            self.stats.characters += len(text)
            self._worker.condition.notify()

    def append_text(self, piece: str) -> None:
        """Stream text into the open segment (dual track): speech starts with its first word."""
        with self._worker.condition:
            if self._closed:
                raise RuntimeError("append_text() after finish()")
            if self._open is None:
                self._open = TextFeed()
                self._segments.append(self._open)
            self._open.append(piece)
            self.stats.characters += len(piece)
            self._worker.condition.notify()

    def close_segment(self) -> None:
        """End the open segment: its speech finishes, later text starts a new one."""
        with self._worker.condition:
            self._close_open_segment()
            self._worker.condition.notify()

    def _close_open_segment(self) -> None:
        if self._open is not None:
            self._open.finish()
            self._open = None

    def finish(self) -> None:
        """No more text will come; the job ends once the queued segments are spoken."""
        with self._worker.condition:
            self._close_open_segment()
            self._closed = True
            self._worker.condition.notify()

    def cancel(self) -> None:
        """Stop before the next step and free the job's model state."""
        with self._worker.condition:
            if not self._done:
                self._cancelled = True
                self._worker.condition.notify()

    @property
    def done(self) -> bool:
        return self._done

    def __aiter__(self):
        return self._chunks()

    async def _chunks(self):
        while True:
            item = await self._queue.get()
            if isinstance(item, JobDone):
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # Called on the worker thread; those marked "locked" with the worker's lock held.

    @property
    def deadline(self) -> float:
        return self.stats.created + self.stats.audio_seconds

    def _settle(self) -> None:
        """(locked) End the job, or pick its next segment, as its state says."""
        if self._done:
            return
        if self._failure is not None:
            self._end(self._failure)
        elif self._cancelled:
            self._end(JobCancelled(f"job {self.id} cancelled"))
        elif self.current is None and self._starting is None:
            if self._segments:
                self._starting = (self._segments.popleft(), self._segment_count)
                self._segment_count += 1
            elif self._closed:
                self._end(JobDone())

    @property
    def needs_prefill(self) -> bool:
        """(locked) A new utterance to build, or one whose prompt just became ready to prefill."""
        if self._done:
            return False
        if self._starting is not None:
            return True
        current = self.current
        return current is not None and current.state is None and (current.needs_prefill or current.has_text_news)

    @property
    def has_text_news(self) -> bool:
        """(locked) Text arrived for an utterance that is already generating."""
        current = self.current
        return not self._done and current is not None and current.state is not None and current.has_text_news

    @property
    def steppable(self) -> bool:
        """(locked) Its utterance can take part in the next step."""
        if self._done or self._cancelled or self._failure is not None:
            return False
        return self.current is not None and self.current.steppable

    def _prefill(self) -> None:
        """Build the utterance of a new segment (if any) and prefill it when its prompt is ready."""
        if self._starting is not None:
            text, index = self._starting
            self._starting = None
            self.current = self._make_utterance(text, index)
        self.runtime.prepare(self.current)
        self._after_work()

    def _take_text(self) -> None:
        self.runtime.prepare(self.current)
        self._after_work()

    def _stepped(self, chunk: CodeChunk | None) -> "ChunkToDecode | None":
        """After a step: the chunk to decode, if the step completed one; closes a finished utterance."""
        to_decode = None
        if chunk is not None:
            for listener in self._worker.frame_listeners:
                listener(self.id, chunk)
            to_decode = ChunkToDecode(self, self.current, chunk)
        self._after_work()
        return to_decode

    def _after_work(self) -> None:
        if self.current is not None and self.current.finished:
            self.stats.end_segment(self.current.finish_reason or "empty")
            self.current = None

    def _fail(self, error: BaseException) -> None:
        with self._worker.condition:
            if not self._done:
                self._end(error)

    def _post(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self._cancelled = True

    def _end(self, item) -> None:
        """(locked)"""
        self._done = True
        if self.current is not None:
            self.current.cancel()
            self.current = None
        self._starting = None
        self._segments.clear()
        # Behind the chunks still being decoded.
        self._worker.after_decoding(self, lambda: self._post_end(item))

    def _post_end(self, item) -> None:
        self.stats.finished = time.monotonic()
        if isinstance(item, JobDone) and self._failure is not None:
            # A chunk failed to decode after the last step: the audio is not whole, and the
            # listener must hear so rather than a normal end.
            item = self._failure
        self._post(item)

    @property
    def wants_audio(self) -> bool:
        """Someone will hear the audio of its chunks (not cancelled, not failed)."""
        return not self._cancelled and self._failure is None

    def _decode_failed(self, error: BaseException) -> None:
        """On the decode thread: end the job with ``error`` at its next turn."""
        with self._worker.condition:
            self._failure = error
            self._worker.condition.notify()

    def _deliver(self, chunk: AudioChunk) -> None:
        """On the decode thread: hand a decoded chunk to the listener."""
        with self._worker.condition:
            self.stats.record(chunk)
            self._post(chunk)


@dataclass(frozen=True)
class ChunkToDecode:
    job: SynthesisJob
    utterance: Utterance
    chunk: CodeChunk

    @property
    def group(self) -> tuple[int, int]:
        """Chunks that can share one codec call: the same codec, the same number of frames."""
        return id(self.job.runtime.decoder), self.chunk.frames

    @property
    def opens_job(self) -> bool:
        """The request's first audio: its listener hears nothing until this chunk is decoded."""
        return self.utterance.segment == 0 and self.chunk.first_frame == 0


def decode_chunks(items: list[ChunkToDecode]) -> None:
    """On the decode thread: decode chunks of one length, of several jobs, in one codec call."""
    live = [item for item in items if item.job.wants_audio]  # nobody will hear the others
    if not live:
        return
    try:
        audio = live[0].job.runtime.decode_batch([item.utterance for item in live], [item.chunk for item in live])
    except Exception as err:  # noqa: BLE001 - the failing request fails, the others go on
        if len(live) > 1:
            _LOGGER.warning("Decoding %d chunks together failed (%s: %s); decoding each alone", len(live), type(err).__name__, err)
            for item in live:
                decode_chunks([item])
            return
        _LOGGER.exception("Decoding audio for job %s failed", live[0].job.id)
        live[0].job._decode_failed(err)
        return
    for item, chunk in zip(live, audio):
        item.job._deliver(chunk)
