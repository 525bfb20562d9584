"""The decode threads: codec work in deadline order, chunks of several streams decoded together.

Several streams share one codec thread. First in, first out would make a new request's first
chunk wait behind every chunk the running streams have queued; instead the work whose listener
runs out of audio first goes first. A job's deadline only grows as its audio is delivered, so its
own items (chunks, then its end marker) still come out in the order they went in.

When the first item is a chunk, the next chunks of other jobs that can share its codec call (same
codec, same number of frames) come along, up to the batch size and a total of frames: one call
decodes them all. On a CPU a call pays up to about 24 frames (`CPU_DECODE_FRAMES` says why).

With more than one thread, different jobs' chunks decode at the same time (one job's never): on a
CPU the model's thread runs ahead of the codec while several streams play, and the codec's
convolutions release the interpreter lock, so a second decode thread puts an idle core to work.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

_LOGGER = logging.getLogger(__name__)


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
    ) -> None:
        self.max_batch = max_batch
        self.max_size = max_size  # most total size of one batch (None: no limit)
        self._run_batch = run_batch
        self._heap: list[tuple[float, int, QueuedWork]] = []
        self._order = itertools.count()
        self._condition = threading.Condition()
        self._closed = False
        self._running: set[int] = set()  # owners with an item in progress
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

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
            self._condition.notify()

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

    def _run(self) -> None:
        while True:
            with self._condition:
                while (batch := self._take() if self._heap else None) is None:
                    if self._closed and not self._heap and not self._running:
                        self._condition.notify_all()
                        return
                    self._condition.wait()
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
