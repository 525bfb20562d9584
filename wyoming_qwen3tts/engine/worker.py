"""The single thread that owns the models: it runs every request, a frame at a time.

Audio is decoded on a second thread, in the order the frames were made, so that decoding one
chunk overlaps generating the next (on a CPU the codec costs about a tenth of a frame).

Requests ("jobs") are scheduled earliest-deadline-first, where a job's deadline is the moment
its listener runs out of audio: its arrival time plus the seconds of audio it has received. A
new request therefore gets the next frame, a request far ahead of real time waits, and a long
request cannot starve a short one. Cancelling a job takes effect before its next frame.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from ..speech import AudioChunk, JobCancelled, JobStats
from .text_feed import TextFeed
from .utterance import CodeChunk, Utterance

_LOGGER = logging.getLogger(__name__)


class JobDone:
    """End-of-stream marker on a job's queue."""


# Builds the utterance for one segment (its text, or the feed it streams in through) and its
# index; runs on the worker thread (it touches the model).
UtteranceFactory = Callable[[str | TextFeed, int], Utterance]


class SynthesisJob:
    """One request: text segments in (possibly while it runs), audio chunks out."""

    _ids = itertools.count(1)

    def __init__(self, worker: "EngineWorker", make_utterance: UtteranceFactory, loop: asyncio.AbstractEventLoop) -> None:
        self.id = next(self._ids)
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
        """Stop before the next frame and free the job's model state."""
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

    # Called on the worker thread, with the worker's lock held unless noted.

    @property
    def deadline(self) -> float:
        return self.stats.created + self.stats.audio_seconds

    @property
    def runnable(self) -> bool:
        if self._done:
            return False
        if self._cancelled or self._failure is not None:
            return True
        if self.current is not None:
            return not self.current.waiting_for_text
        return bool(self._segments) or self._closed

    def _post(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self._cancelled = True

    def _end(self, item) -> None:
        self._done = True
        if self.current is not None:
            self.current.cancel()
            self.current = None
        self._segments.clear()
        # Behind the chunks still being decoded.
        self._worker.after_decoding(lambda: self._post_end(item))

    def _post_end(self, item) -> None:
        self.stats.finished = time.monotonic()
        self._post(item)

    def _take_work(self) -> tuple[str | TextFeed, int] | None:
        """A new segment to start, as (its text or feed, its index); ends the job when all is done."""
        if self._failure is not None:
            self._end(self._failure)
            return None
        if self._cancelled:
            self._end(JobCancelled(f"job {self.id} cancelled"))
            return None
        if self.current is None and not self._segments:
            self._end(JobDone())
            return None
        if self.current is None:
            text = self._segments.popleft()
            index = self._segment_count
            self._segment_count += 1
            return text, index
        return None

    def _run_once(self, work: tuple[str | TextFeed, int] | None) -> None:
        """One unit of model work; called without the lock."""
        if work is not None:
            text, index = work
            self.current = self._make_utterance(text, index)
        utterance = self.current
        codes = utterance.advance_codes()
        if codes is not None:
            for listener in self._worker.frame_listeners:
                listener(self.id, codes)
            self._worker.after_decoding(lambda: self._decode(utterance, codes))
        if utterance.finished:
            self.stats.end_segment(self.current.finish_reason or "empty")
            self.current = None

    def _decode(self, utterance: Utterance, codes: CodeChunk) -> None:
        """On the decode thread, without the lock."""
        if self._cancelled or self._failure is not None:  # nobody will hear it
            return
        try:
            chunk = utterance.decode(codes)
        except Exception as err:  # noqa: BLE001 - this request fails, the others go on
            _LOGGER.exception("Decoding audio for job %s failed", self.id)
            with self._worker.condition:
                self._failure = err
                self._worker.condition.notify()
            return
        with self._worker.condition:
            self._deliver(chunk)

    def _deliver(self, chunk: AudioChunk) -> None:
        self.stats.record(chunk)
        self._post(chunk)


class EngineWorker:
    """Owns the model thread; jobs are created through `new_job`."""

    def __init__(self, name: str = "qwen3tts-engine") -> None:
        self.condition = threading.Condition()
        self._jobs: list[SynthesisJob] = []
        self._tasks: deque[tuple[Callable[[], object], Future]] = deque()
        self._stopping = False
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-decode")
        # Called on the model thread with (job id, frames) each time a chunk's frames exist:
        # for tests and diagnostics that need the codes behind the audio.
        self.frame_listeners: list[Callable[[int, CodeChunk], None]] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def new_job(self, make_utterance: UtteranceFactory, loop: asyncio.AbstractEventLoop) -> SynthesisJob:
        job = SynthesisJob(self, make_utterance, loop)
        with self.condition:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            self._jobs.append(job)
        return job

    def submit(self, task: Callable[[], object]) -> Future:
        """Run ``task`` on the model thread before the next frame; its result comes in the future."""
        future: Future = Future()
        with self.condition:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            self._tasks.append((task, future))
            self.condition.notify()
        return future

    @property
    def active_jobs(self) -> int:
        with self.condition:
            return sum(1 for job in self._jobs if not job.done)

    def after_decoding(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the decode thread once everything submitted before it has run."""
        try:
            self._decoder.submit(work)
        except RuntimeError:  # shut down after a stop that timed out: nothing is queued any more
            work()

    def stop(self, timeout: float | None = 10.0) -> None:
        with self.condition:
            self._stopping = True
            self.condition.notify_all()
        self._thread.join(timeout)
        self._decoder.shutdown(wait=True)

    def _next(self) -> Callable[[], None] | None:
        """The next unit of work, or None when stopping."""
        with self.condition:
            while True:
                if self._stopping:
                    for job in self._jobs:
                        if not job.done:
                            job._end(JobCancelled("the engine is shutting down"))
                    self._jobs.clear()
                    for _task, future in self._tasks:
                        future.cancel()
                    return None
                if self._tasks:
                    task, future = self._tasks.popleft()
                    return lambda: self._run_task(task, future)
                self._jobs = [job for job in self._jobs if not job.done]
                runnable = [job for job in self._jobs if job.runnable]
                if not runnable:
                    self.condition.wait()
                    continue
                job = min(runnable, key=lambda j: (j.deadline, j.id))
                work = job._take_work()
                if not job.done:
                    return lambda: self._run_job(job, work)

    @staticmethod
    def _run_task(task: Callable[[], object], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(task())
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits for it
            future.set_exception(err)

    def _run_job(self, job: SynthesisJob, work: tuple[str | TextFeed, int] | None) -> None:
        try:
            job._run_once(work)
        except Exception as err:  # noqa: BLE001 - one request's failure must not stop the others
            _LOGGER.exception("Synthesis job %s failed", job.id)
            with self.condition:
                job._end(err)

    def _run(self) -> None:
        while (unit := self._next()) is not None:
            unit()
