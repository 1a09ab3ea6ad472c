"""The sans-IO batch scheduler, driven by a fake clock (plain floats)."""

from __future__ import annotations

from typing import TypeVar

import pytest

from webtorch.serve.batcher import BatchScheduler, Queued, QueueFull

T = TypeVar("T")


def items(batch: list[Queued[T]] | None) -> list[T]:
    assert batch is not None, "expected a batch"
    return [entry.item for entry in batch]


def test_lone_item_dispatches_at_once() -> None:
    sched: BatchScheduler[str] = BatchScheduler(max_batch=8)
    assert sched.poll(0.0) is None  # empty
    sched.add("a", 1, now=10.0)
    batch = sched.poll(10.0)
    assert items(batch) == ["a"]
    assert batch is not None and batch[0].rows == 1 and batch[0].arrived == 10.0
    assert sched.busy
    assert sched.queued_rows == 0 and len(sched) == 0
    assert sched.wake_at() is None


def test_arrivals_while_busy_accumulate_and_go_together_after_finish() -> None:
    sched: BatchScheduler[str] = BatchScheduler(max_batch=8)
    sched.add("a", 1, 0.0)
    assert items(sched.poll(0.0)) == ["a"]
    sched.add("b", 2, 0.1)
    sched.add("c", 1, 0.2)
    sched.add("d", 3, 0.3)
    assert sched.poll(0.4) is None  # busy: nothing goes
    assert sched.wake_at() is None
    assert sched.queued_rows == 6 and len(sched) == 3
    sched.finish()
    assert not sched.busy
    assert items(sched.poll(0.5)) == ["b", "c", "d"]
    assert sched.queued_rows == 0
    sched.finish()
    assert sched.poll(0.6) is None


def test_max_batch_rows_respected_fifo_and_items_never_split() -> None:
    sched: BatchScheduler[str] = BatchScheduler(max_batch=4)
    for name, rows in [("a", 2), ("b", 1), ("c", 2), ("d", 1), ("e", 4)]:
        sched.add(name, rows, 0.0)
    # a+b = 3 rows; c (2) would make 5: it waits, and so does d behind it (FIFO, no overtaking).
    first = sched.poll(0.0)
    assert items(first) == ["a", "b"]
    assert sched.queued_rows == 7
    sched.finish()
    second = sched.poll(0.0)
    assert items(second) == ["c", "d"]
    assert second is not None and sum(e.rows for e in second) == 3  # e (4) does not fit
    sched.finish()
    assert items(sched.poll(0.0)) == ["e"]
    sched.finish()
    assert sched.poll(0.0) is None and sched.queued_rows == 0


def test_every_batch_within_max_batch_and_order_preserved() -> None:
    sched: BatchScheduler[int] = BatchScheduler(max_batch=5)
    sizes = [3, 1, 4, 1, 5, 2, 2, 3, 5, 1]
    for i, rows in enumerate(sizes):
        sched.add(i, rows, float(i))
    seen: list[int] = []
    while (batch := sched.poll(100.0)) is not None:
        assert 1 <= sum(e.rows for e in batch) <= 5
        seen.extend(e.item for e in batch)
        sched.finish()
    assert seen == list(range(len(sizes)))


def test_max_delay_waits_until_oldest_arrival_plus_delay() -> None:
    sched: BatchScheduler[str] = BatchScheduler(max_batch=8, max_delay=0.010)
    sched.add("a", 1, 1.000)
    assert sched.wake_at() == pytest.approx(1.010)
    assert sched.poll(1.000) is None
    sched.add("b", 2, 1.005)
    assert sched.wake_at() == pytest.approx(1.010)  # the oldest arrival decides
    assert sched.poll(1.009) is None
    assert not sched.busy  # waiting is not busy
    assert items(sched.poll(1.010)) == ["a", "b"]
    assert sched.wake_at() is None  # busy


def test_max_delay_full_batch_goes_at_once() -> None:
    sched: BatchScheduler[str] = BatchScheduler(max_batch=4, max_delay=1.0)
    sched.add("a", 3, 0.0)
    assert sched.poll(0.0) is None
    sched.add("b", 1, 0.1)
    assert items(sched.poll(0.1)) == ["a", "b"]  # 4 rows: full, no waiting


def test_max_delay_overfull_queue_takes_a_full_batch_at_once() -> None:
    sched: BatchScheduler[str] = BatchScheduler(max_batch=4, max_delay=1.0)
    sched.add("a", 3, 0.0)
    sched.add("b", 2, 0.0)
    assert items(sched.poll(0.0)) == ["a"]  # 5 rows queued >= max_batch; b does not fit
    sched.finish()
    # b alone is not full; it waits for its own deadline (its arrival + delay).
    assert sched.wake_at() == pytest.approx(1.0)
    assert sched.poll(0.5) is None
    assert items(sched.poll(1.0)) == ["b"]


def test_max_delay_wake_at_follows_the_new_oldest_after_finish() -> None:
    sched: BatchScheduler[str] = BatchScheduler(max_batch=2, max_delay=0.5)
    sched.add("a", 2, 0.0)
    assert items(sched.poll(0.0)) == ["a"]
    sched.add("b", 1, 0.2)
    assert sched.wake_at() is None  # busy
    sched.finish()
    assert sched.wake_at() == pytest.approx(0.7)
    assert sched.poll(0.69) is None
    assert items(sched.poll(0.7)) == ["b"]


def test_no_delay_means_no_wake() -> None:
    sched: BatchScheduler[str] = BatchScheduler(max_batch=4)
    sched.add("a", 1, 0.0)
    assert sched.wake_at() is None


def test_queue_full_at_max_queue() -> None:
    sched: BatchScheduler[str] = BatchScheduler(max_batch=4, max_queue=5)
    sched.add("a", 4, 0.0)
    sched.add("b", 1, 0.0)
    with pytest.raises(QueueFull):
        sched.add("c", 1, 0.0)
    assert sched.queued_rows == 5 and len(sched) == 2  # the refused item left no trace
    batch = sched.poll(0.0)
    assert items(batch) == ["a"]
    sched.add("c", 1, 0.0)  # room again once rows left the queue
    assert sched.queued_rows == 2


def test_rows_over_max_batch_rejected() -> None:
    sched: BatchScheduler[str] = BatchScheduler(max_batch=4)
    with pytest.raises(ValueError, match="max_batch"):
        sched.add("big", 5, 0.0)
    assert len(sched) == 0 and sched.queued_rows == 0


@pytest.mark.parametrize(("max_batch", "max_delay"), [(0, 0.0), (4, -0.1)])
def test_invalid_parameters(max_batch: int, max_delay: float) -> None:
    with pytest.raises(ValueError):
        BatchScheduler(max_batch, max_delay)


def test_queued_snapshot_and_drain() -> None:
    sched: BatchScheduler[str] = BatchScheduler(max_batch=4)
    sched.add("a", 1, 0.0)
    sched.add("b", 2, 1.0)
    assert [q.item for q in sched.queued()] == ["a", "b"]
    drained = sched.drain()
    assert [q.item for q in drained] == ["a", "b"]
    assert len(sched) == 0 and sched.queued_rows == 0
    assert sched.poll(2.0) is None


def test_growing_while_arrivals_continue_below_max_batch() -> None:
    sched: BatchScheduler[str] = BatchScheduler(max_batch=4)
    assert not sched.growing()  # empty
    sched.add("a", 1, 0.0)
    assert sched.growing()  # a first arrival: another turn may bring more
    sched.add("b", 1, 0.1)
    assert sched.growing()  # it grew since
    assert not sched.growing()  # a turn without arrivals: cut now
    assert items(sched.poll(0.2)) == ["a", "b"]
    sched.finish()
    sched.add("c", 1, 0.3)
    assert sched.growing()  # the next batch starts afresh
    sched.add("d", 3, 0.4)
    assert not sched.growing()  # full: waiting cannot add to it
    assert items(sched.poll(0.5)) == ["c", "d"]
