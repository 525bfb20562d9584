"""The decode threads: codec work in deadline order, chunks of several streams decoded together.

Several streams share one codec thread. First in, first out would make a new request's first
chunk wait behind every chunk the running streams have queued; instead the work whose listener
runs out of audio first goes first. A job's deadline only grows as its audio is delivered, so its
own items (chunks, then its end marker) still come out in the order they went in.

When the first item is a chunk, the next chunks of other jobs that can share its codec call (same
codec, same number of frames) come along, up to the batch size and a total of frames: one call
decodes them all. On a CPU a call pays up to about 24 frames (`CPU_DECODE_FRAMES` says why).

With more than one thread, different jobs' chunks decode at the same time (one job's never). The
threads after the first are spare. A CPU's cores are shared out as the model's threads plus the
rest (at least one) for each decode thread, and a second decode beside a busy model thread takes
the model's core: while the model bounds the streams, that slows every one of them (a tiny 8-row
step: 32-40 ms with two decodes at once, 23 ms with one, timed in `bench.py`). So a spare thread
takes work only while `spares_open` (the engine opens it while its model thread has nothing to
do), or when the earliest waiting work's deadline is less than `URGENT_SECONDS` away: a listener
about to run out of audio needs the codec more than the model needs its core, which is the case
while the codec bounds.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

_LOGGER = logging.getLogger(__name__)

# How close (seconds, on time.monotonic's clock) the earliest deadline must be for a spare thread
# to decode while the model thread is busy: about one 12-frame chunk of audio.
URGENT_SECONDS = 1.0


@dataclass(frozen=True)
class QueuedWork:
    owner: object  # one owner's items run in the order they were submitted, never together
    group: Hashable | None  # items of one group may run as one batch; None: a callable run alone
    work: object
    size: int = 1  # what counts against a batch's total (a chunk's frames)


class DecodeQueue:
    """Threads that run submitted work, earliest deadline first (ties: first submitted), one
    owner's items one at a time and in order."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[object]], None],
        max_batch: int = 1,
        max_size: int | None = None,
        threads: int = 1,
        on_thread_start: Callable[[], None] | None = None,
    ) -> None:
        """``on_thread_start``: run first on each thread; the queue is returned once every thread has run it."""
        self.max_batch = max_batch
        self.max_size = max_size  # most total size of one batch (None: no limit)
        self._run_batch = run_batch
        self._heap: list[tuple[float, int, QueuedWork]] = []
        self._order = itertools.count()
        self._condition = threading.Condition()
        self._closed = False
        self._running: set[int] = set()  # owners with an item in progress
        self._spares_open = True
        started = threading.Barrier(threads + 1)
        self._threads = [
            threading.Thread(target=self._start, args=(i > 0, on_thread_start, started), name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()
        started.wait()

    def submit(self, deadline: float, owner: object, work: object, group: Hashable | None = None, size: int = 1) -> None:
        """Queue ``work`` (a callable when ``group`` is None); raises RuntimeError once shut down."""
        self.submit_all([(deadline, QueuedWork(owner, group, work, size))])

    def submit_all(self, items: list[tuple[float, QueuedWork]]) -> None:
        """Queue several (deadline, work) at once: the thread sees them together."""
        with self._condition:
            if self._closed:
                raise RuntimeError("the decode queue is shut down")
            for deadline, work in items:
                heapq.heappush(self._heap, (deadline, next(self._order), work))
            # Every thread: a spare one that is woken may decline the work, which must not be lost.
            self._condition.notify_all()

    @property
    def spares_open(self) -> bool:
        """Whether the threads after the first may take work."""
        return self._spares_open

    @spares_open.setter
    def spares_open(self, value: bool) -> None:
        with self._condition:
            if value != self._spares_open:
                self._spares_open = value
                if value:
                    self._condition.notify_all()

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        with self._condition:
            return not self._heap and not self._running

    def shutdown(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop the thread."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _take(self) -> list[QueuedWork] | None:
        """(locked) The earliest runnable item and the items that may share its batch; None if
        every queued item's owner has one in progress."""
        batch: list[QueuedWork] = []
        seen, taken, size = set(self._running), set(), 0
        for entry in sorted(self._heap):
            item = entry[2]
            if id(item.owner) in seen:
                continue  # its owner is busy, or this is not the owner's next item
            seen.add(id(item.owner))
            if batch:
                if batch[0].group is None or item.group != batch[0].group or len(batch) == self.max_batch:
                    continue
                if self.max_size is not None and size + item.size > self.max_size:
                    continue
            batch.append(item)
            taken.add(entry[1])
            size += item.size
            if batch[0].group is None:
                break
        if not batch:
            return None
        self._heap = [entry for entry in self._heap if entry[1] not in taken]
        heapq.heapify(self._heap)
        self._running.update(id(item.owner) for item in batch)
        return batch

    def _spare_wait(self) -> float:
        """(locked) For a spare thread with work queued: 0 if it may take work now, else the seconds
        until the earliest deadline becomes urgent."""
        if self._spares_open:
            return 0.0
        return max(0.0, self._heap[0][0] - URGENT_SECONDS - time.monotonic())

    def _start(self, spare: bool, on_thread_start: Callable[[], None] | None, started: threading.Barrier) -> None:
        try:
            if on_thread_start is not None:
                on_thread_start()
        except Exception:  # noqa: BLE001 - a thread that runs on other settings still decodes
            _LOGGER.exception("Setting up a decode thread failed")
        finally:
            started.wait()
        self._run(spare)

    def _run(self, spare: bool) -> None:
        while True:
            with self._condition:
                while True:
                    wait = None
                    if self._heap:
                        wait = self._spare_wait() if spare else 0.0
                        if wait == 0.0:
                            if (batch := self._take()) is not None:
                                break
                            wait = None  # every queued item's owner is busy: wait for one to finish
                    if self._closed and not self._heap and not self._running:
                        self._condition.notify_all()
                        return
                    self._condition.wait(wait)
            try:
                if batch[0].group is None:
                    batch[0].work()
                else:
                    self._run_batch([item.work for item in batch])
            except Exception:  # noqa: BLE001 - the work reports its own failures; never lose the thread
                _LOGGER.exception("Decode work failed")
            finally:
                with self._condition:
                    self._running.difference_update(id(item.owner) for item in batch)
                    self._condition.notify_all()
