"""The single thread that owns the models: it runs every request, a batched frame step at a time.

Each round of the model thread:

1. takes the text that arrived for streaming (dual-track) utterances into their prompts;
2. prefills the new utterances whose listeners have waited longest, as many as take no longer
   than one step (at least one): a new request joins the next step, and the streams already
   running wait for a round's prefills no longer than for a step of their own. Where a prefill
   costs a fraction of a step (a GPU, whose steps are bound by launching operators, or a small
   model), requests that arrive together start together instead of one per round;
3. makes one frame for each of up to `max_batch` utterances of one model in one batched step:
   the rows whose listeners run out of audio first (earliest deadline, where a job's deadline is
   its arrival time plus the seconds of audio it has received). Reading the weights once for
   many rows is what makes several streams cost little more than one.

Rows join a batch as soon as they are prefilled and leave it when they finish, are cancelled,
fail, or wait for text. Audio is decoded on decode threads (`DecodeQueue`), also earliest
deadline first, so that decoding overlaps generation; a request's first chunk, its listener's
whole wait, decodes on the model thread right after the step that made it. A round that starts
while nothing is being decoded runs on every core; a second decode thread runs only while the model
thread has nothing to do or a listener is about to run out of audio (`DecodeQueue`). Cancelling a
job takes effect before its next step.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from threading import Condition, Thread
from typing import TYPE_CHECKING, Callable

import torch

from ..speech import JobCancelled
from .decode_queue import DecodeQueue, QueuedWork
from .job import ChunkToDecode, SynthesisJob, UtteranceFactory, decode_chunks
from .utterance import CodeChunk

if TYPE_CHECKING:
    from .runtime import ModelRuntime

_LOGGER = logging.getLogger(__name__)


@dataclass
class _Round:
    """What one round of the model thread does before its batched step."""

    task: tuple[Callable[[], object], Future] | None = None
    text_news: list[SynthesisJob] = field(default_factory=list)
    prefills: list[SynthesisJob] = field(default_factory=list)


class EngineWorker:
    """Owns the model thread; jobs are created through `new_job`."""

    def __init__(
        self,
        max_batch: int = 1,
        decode_frames: int | None = None,
        decode_threads: int = 1,
        idle_codec_threads: int | None = None,
        codec_threads: int | None = None,
        name: str = "qwen3tts-engine",
    ) -> None:
        """``decode_frames``: most frames of one codec call (None: no limit beyond max_batch chunks);
        ``decode_threads``: threads that decode different streams' chunks at the same time (all but the
        first only while this thread has nothing to do, or for a listener about to run out of audio);
        ``idle_codec_threads``: PyTorch CPU threads of a round that starts while nothing is being
        decoded (None: the model thread's own); ``codec_threads``: PyTorch CPU threads of each
        decoding thread (None: the model thread's own). The model thread runs on as many threads
        as the thread that creates the worker."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._max_batch = max_batch
        self._idle_codec_threads = idle_codec_threads
        self.condition = Condition()
        self._jobs: list[SynthesisJob] = []
        self._tasks: deque[tuple[Callable[[], object], Future]] = deque()
        self._stopping = False
        self._model_threads = torch.get_num_threads()
        self.codec_threads = codec_threads  # each decode thread's PyTorch threads (None: the model's)
        self._decoder = DecodeQueue(
            f"{name}-decode",
            decode_chunks,
            max_batch,
            decode_frames,
            decode_threads,
            on_thread_start=None if codec_threads is None else functools.partial(use_threads, codec_threads),
        )
        # Called on the model thread with (job id, frames) each time a chunk's frames exist:
        # for tests and diagnostics that need the codes behind the audio.
        self.frame_listeners: list[Callable[[int, CodeChunk], None]] = []
        # Called on the model thread with the job ids of every batched step: for tests and monitoring.
        self.step_listeners: list[Callable[[list[int]], None]] = []
        # Moving averages of the model thread's batched steps and prefills (seconds): how many
        # prefills a round can take (`_prefills_per_round`). None until one has been timed.
        self._step_seconds: float | None = None
        self._prefill_seconds: float | None = None
        self._thread = Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def new_job(
        self, runtime: "ModelRuntime", make_utterance: UtteranceFactory, loop: asyncio.AbstractEventLoop
    ) -> SynthesisJob:
        job = SynthesisJob(self, runtime, make_utterance, loop)
        with self.condition:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            self._jobs.append(job)
        return job

    def submit(self, task: Callable[[], object]) -> Future:
        """Run ``task`` on the model thread before the next step; its result comes in the future."""
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

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @max_batch.setter
    def max_batch(self, rows: int) -> None:
        """Most rows of a step, and most chunks of one codec call."""
        self._max_batch = rows
        self._decoder.max_batch = rows

    def decode_later(self, chunks: list[ChunkToDecode]) -> None:
        """Decode chunks on the decode thread, each by its job's deadline, after the job's earlier
        chunks. A step's chunks go in together, so that they can share codec calls."""
        try:
            self._decoder.submit_all([(c.job.deadline, QueuedWork(c.job, c.group, c, c.chunk.frames)) for c in chunks])
        except RuntimeError:  # shut down after a stop that timed out: nothing is queued any more
            for chunk in chunks:
                decode_chunks([chunk])

    def after_decoding(self, job: SynthesisJob, work: Callable[[], None]) -> None:
        """Run ``work`` on the decode thread after the job's chunks queued before it."""
        try:
            self._decoder.submit(job.deadline, job, work)
        except RuntimeError:  # shut down after a stop that timed out: nothing is queued any more
            work()

    def stop(self, timeout: float | None = 10.0) -> None:
        with self.condition:
            self._stopping = True
            self.condition.notify_all()
        self._thread.join(timeout)
        self._decoder.shutdown()

    def _next_round(self) -> _Round | None:
        """What to do before the next step; None when stopping. Waits while there is nothing."""
        with self.condition:
            while True:
                if self._stopping:
                    self._decoder.spares_open = True  # what is queued drains on every thread
                    for job in self._jobs:
                        if not job.done:
                            job._end(JobCancelled("the engine is shutting down"))
                    self._jobs.clear()
                    for _task, future in self._tasks:
                        future.cancel()
                    return None
                if self._tasks:
                    return _Round(task=self._tasks.popleft())
                for job in self._jobs:
                    job._settle()
                self._jobs = [job for job in self._jobs if not job.done]
                starting = sorted((job for job in self._jobs if job.needs_prefill), key=lambda j: (j.deadline, j.id))
                round_ = _Round(
                    text_news=[job for job in self._jobs if job.has_text_news],
                    prefills=starting[: self._prefills_per_round()],
                )
                if round_.text_news or round_.prefills or any(job.steppable for job in self._jobs):
                    self._decoder.spares_open = False
                    return round_
                # Nothing for the model to do: the spare decode threads may have its cores.
                self._decoder.spares_open = True
                self.condition.wait()

    def _prefills_per_round(self) -> int:
        """How many waiting requests the next round prefills: as many as fit in one step's time
        (by the moving averages), at least one, at most `max_batch`; one until both are timed."""
        if self._step_seconds is None or not self._prefill_seconds:
            return 1
        return max(1, min(self.max_batch, int(self._step_seconds / self._prefill_seconds)))

    def _next_batch(self) -> list[SynthesisJob]:
        """The rows of the next step: earliest deadlines first, all of one model, at most max_batch."""
        with self.condition:
            ready = sorted((job for job in self._jobs if job.steppable), key=lambda j: (j.deadline, j.id))
        if not ready:
            return []
        runtime = ready[0].runtime
        return [job for job in ready if job.runtime is runtime][: self.max_batch]

    @staticmethod
    def _run_task(task: Callable[[], object], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(task())
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits for it
            future.set_exception(err)

    @staticmethod
    def _guarded(job: SynthesisJob, work: Callable[[], object]) -> object:
        """``work``'s result; None when it failed, which fails only ``job``."""
        try:
            return work()
        except Exception as err:  # noqa: BLE001 - one request's failure must not stop the others
            _LOGGER.exception("Synthesis job %s failed", job.id)
            job._fail(err)
            return None

    def _step(self, batch: list[SynthesisJob]) -> None:
        """One batched step; the chunks that open a request decode here, the rest are queued (see
        `_decode_here`)."""
        runtime = batch[0].runtime
        try:
            started = time.perf_counter()
            chunks = runtime.step([job.current for job in batch])
            self._step_seconds = _moving_average(self._step_seconds, time.perf_counter() - started)
        except Exception as err:  # noqa: BLE001
            if len(batch) == 1:
                _LOGGER.exception("Synthesis job %s failed", batch[0].id)
                batch[0]._fail(err)
                return
            # Whichever row broke it fails alone; the others go on.
            _LOGGER.warning("A batched step of %d rows failed (%s: %s); retrying each row alone", len(batch), type(err).__name__, err)
            for job in batch:
                self._step([job])
            return
        for listener in self.step_listeners:
            listener([job.id for job in batch])
        to_decode = [self._guarded(job, lambda job=job, chunk=chunk: job._stepped(chunk)) for job, chunk in zip(batch, chunks)]
        to_decode = [item for item in to_decode if item is not None]
        to_decode = self._decode_here(to_decode)
        if to_decode:
            self.decode_later(to_decode)

    @staticmethod
    def _decode_here(chunks: list[ChunkToDecode]) -> list[ChunkToDecode]:
        """Decode the chunks that open a request on this thread, now; the others, to queue.

        A request's first chunk is the whole of its wait for first audio, and the decode queue is
        no place to wait: its deadline (the request's arrival) is later than those of streams
        already behind, and the decode threads may be in the middle of a call of up to
        `decode_frames` frames. Decoded here, it costs the streams of the next step one short
        chunk's decoding (a real-size frame: 80-90 ms on one core), and nothing while the codec
        bounds them: their frames would wait for the codec anyway. Measured on 2 cores (int8,
        real-size), a request arriving while 3 others stream heard its first audio after
        1.1-1.3 s instead of 2.0 s. In a round that starts while the codec idles this runs on
        every core (2 cores: 58 instead of 80 ms for one frame). The request's next frame waits
        for it; later chunks overlap generation on the decode threads. Nothing of the request is
        queued yet, so its chunks stay in order.
        """
        # A cloned voice's first chunk first decodes its reference sample (seconds of audio): not
        # on the thread every stream's next frame waits for.
        here = [chunk for chunk in chunks if chunk.opens_job and chunk.utterance.prompt.ref_codes is None]
        for group in dict.fromkeys(chunk.group for chunk in here):
            decode_chunks([chunk for chunk in here if chunk.group == group])
        decoded = {id(chunk) for chunk in here}
        return [chunk for chunk in chunks if id(chunk) not in decoded]

    def _prefill(self, job: SynthesisJob) -> None:
        started = time.perf_counter()
        self._guarded(job, job._prefill)
        if job.current is not None and job.current.state is not None:  # not a prompt still waiting for text
            self._prefill_seconds = _moving_average(self._prefill_seconds, time.perf_counter() - started)

    @contextmanager
    def _cores_while_codec_idle(self) -> Iterator[None]:
        """The model thread on ``idle_codec_threads`` threads if nothing is being decoded.

        The cores kept free for decoding idle whenever the codec has caught up: on an idle server
        through a new request's prefill, first frame and first chunk (its wait for first audio;
        see `_decode_here`), and in a lone stream whenever decoding is faster than generating.
        Only this thread queues codec work, so a round that starts with the codec idle has no
        decoding thread on its cores until its last act queues its chunks (a thread team sharing
        a core with one would wait on it at every operation). PyTorch's thread count is one for
        the whole process, and the decode threads are idle meanwhile. The model's kernels give
        the same results on any number of threads (tested).
        """
        threads = torch.get_num_threads()
        if not self._idle_codec_threads or self._idle_codec_threads <= threads or not self._decoder.idle:
            yield
            return
        torch.set_num_threads(self._idle_codec_threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> None:
        if self.codec_threads is not None:
            # The decode threads set the process-wide count to theirs; the model's is its own.
            use_threads(self._model_threads)
        while (round_ := self._next_round()) is not None:
            if round_.task is not None:
                self._run_task(*round_.task)
                continue
            with self._cores_while_codec_idle():
                for job in round_.text_news:
                    self._guarded(job, job._take_text)
                for job in round_.prefills:
                    self._prefill(job)
                batch = self._next_batch()
                if batch:
                    self._step(batch)


def use_threads(threads: int) -> None:
    """Run this thread's PyTorch operations on ``threads`` CPU threads, whatever other threads set.

    PyTorch keeps one thread count per process and a team size per thread: a thread takes the
    process's count at its first parallel operation (`get_num_threads` makes that happen now), and
    keeps it until it sets its own. So the decode threads each get a team that fits the cores the
    model leaves, instead of a team as large as the model's: on 4 cores the model's 3 threads and
    a codec's 3 would otherwise ask for 6.
    """
    torch.set_num_threads(threads)
    torch.get_num_threads()


def _moving_average(average: float | None, value: float, weight: float = 0.3) -> float:
    """``value`` folded into ``average``: recent rounds count most, one odd round (a clone's
    reference audio, a page fault) does not decide alone."""
    return value if average is None else average + weight * (value - average)
