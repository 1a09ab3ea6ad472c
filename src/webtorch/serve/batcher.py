"""The dynamic batch scheduler, sans-IO: items and ``now`` in, batches out.

Policy (no fixed delay by default): while a batch is computing, arrivals accumulate; when the model
is idle, whatever is queued goes at once, up to ``max_batch`` rows, so a lone request waits for
nothing. With ``max_delay`` > 0 an idle model waits up to that long after the oldest arrival for the
batch to fill (Triton's ``max_queue_delay``), trading a little latency for bigger batches.

The I/O shell (``executor.py``) asks ``scheduler.py``, which polls these queues (inference's and
training's) whenever something may have changed; the shell arms a timer for :meth:`wake_at` and
never decides anything itself.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from webtorch.vocab import MAX_QUEUED_ROWS

T = TypeVar("T")


class QueueFull(Exception):
    """The queue holds ``max_queue`` rows already; the caller should shed load (503)."""


class Queued(Generic[T]):
    # A plain class, not a dataclass: mypyc (webtorch/compiled.py) builds a generic dataclass
    # into a module that fails to import.
    __slots__ = ("arrived", "item", "rows")

    def __init__(self, item: T, rows: int, arrived: float) -> None:
        self.item = item
        self.rows = rows
        self.arrived = arrived


class BatchScheduler(Generic[T]):
    def __init__(
        self, max_batch: int, max_delay: float = 0.0, max_queue: int = MAX_QUEUED_ROWS
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_delay < 0:
            raise ValueError("max_delay must be >= 0")
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue = max_queue
        self._queue: deque[Queued[T]] = deque()
        self._queued_rows = 0
        self._seen_rows = 0  # queued rows at the last growing() call
        self.busy = False

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, item: T, rows: int, now: float) -> None:
        """Queue ``item`` of ``rows`` batch rows; an item never exceeds ``max_batch`` rows."""
        if rows > self.max_batch:
            raise ValueError(f"{rows} rows exceed max_batch {self.max_batch}")
        if self._queued_rows + rows > self.max_queue:
            raise QueueFull(f"queue holds {self._queued_rows} rows (max {self.max_queue})")
        self._queue.append(Queued(item, rows, now))
        self._queued_rows += rows

    def poll(self, now: float) -> list[Queued[T]] | None:
        """The batch to run now, marking the scheduler busy; None if busy, empty or waiting."""
        if self.busy or not self._queue:
            return None
        if (
            self.max_delay > 0
            and self._queued_rows < self.max_batch
            and now < self._queue[0].arrived + self.max_delay
        ):
            return None
        batch: list[Queued[T]] = []
        rows = 0
        queue = self._queue
        while queue and rows + queue[0].rows <= self.max_batch:
            entry = queue.popleft()
            rows += entry.rows
            batch.append(entry)
        self._queued_rows -= rows
        self.busy = True
        return batch

    def growing(self) -> bool:
        """For a caller that asks once per event-loop turn, before polling: whether the queue,
        below ``max_batch``, grew since it last asked, that is, arrivals are still coming in and
        another turn would add them to this batch. False once it stops growing or fills (and
        the next batch starts afresh). The training scheduler waits on it (see
        ``serve/scheduler.py``): a turn costs an ``epoll_wait``, a step a fixed few hundred
        microseconds of torch however few its rows, and the core never idles waiting, as it
        would with ``max_delay``."""
        rows = self._queued_rows
        if rows >= self.max_batch or rows <= self._seen_rows:
            self._seen_rows = 0
            return False
        self._seen_rows = rows
        return True

    def wake_at(self) -> float | None:
        """When :meth:`poll` may next return a batch without another event (max_delay expiry)."""
        if self.busy or not self._queue or self.max_delay <= 0:
            return None
        return self._queue[0].arrived + self.max_delay

    def finish(self) -> None:
        """The running batch is done; the next :meth:`poll` may dispatch again."""
        self.busy = False

    def oldest(self) -> float:
        """When the oldest item queued arrived (the queue is not empty)."""
        return self._queue[0].arrived

    def queued(self) -> list[Queued[T]]:
        """A snapshot of what is queued, oldest first."""
        return list(self._queue)

    def drain(self) -> list[Queued[T]]:
        """Remove and return everything queued (shutdown)."""
        items = list(self._queue)
        self._queue.clear()
        self._queued_rows = 0
        return items
