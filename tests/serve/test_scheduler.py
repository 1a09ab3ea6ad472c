"""Which work a model runs next (serve/scheduler.py), with no event loop: plain calls, a made-up
``now``, and the head step's state as the training pipeline would report it."""

from __future__ import annotations

import pytest

from webtorch.serve.batcher import BatchScheduler, Queued
from webtorch.serve.scheduler import (
    AGAIN,
    APPLY,
    GROUP,
    HEAD_BUSY,
    HEAD_READY,
    HEAD_WAITING,
    IDLE,
    INFER,
    NO_STEP,
    PREPARE,
    TIMER,
    Priority,
    Scheduler,
    shared,
)


def make(
    priority: Priority = "inference", max_batch: int = 2, max_delay: float = 0.0
) -> Scheduler[str, str]:
    return Scheduler(BatchScheduler(max_batch, max_delay), BatchScheduler(max_batch, 0.0), priority)


def tq(sched: Scheduler[str, str]) -> BatchScheduler[str]:
    """The train queue."""
    assert sched.training is not None
    return sched.training


def batch_items(sched: Scheduler[str, str]) -> list[str]:
    batch: list[Queued[str]] | None = sched.batch
    assert batch is not None
    return [entry.item for entry in batch]


def test_inference_alone_runs_at_once_and_then_idles() -> None:
    sched: Scheduler[str, str] = Scheduler(BatchScheduler(4))
    assert sched.next(0.0, NO_STEP) == IDLE and not sched.pending()
    sched.inference.add("a", 1, 1.0)
    assert sched.pending()
    assert sched.next(1.0, NO_STEP) == INFER and batch_items(sched) == ["a"]
    sched.inference.add("b", 1, 1.1)
    assert sched.next(1.1, NO_STEP) == IDLE  # the batch still runs: b waits for finish()
    sched.inference.finish()
    assert sched.next(1.2, NO_STEP) == INFER and batch_items(sched) == ["b"]


def test_max_delay_asks_for_a_timer_then_runs_the_batch() -> None:
    sched = make(max_batch=4, max_delay=0.5)
    sched.inference.add("a", 1, 10.0)
    assert sched.next(10.0, NO_STEP) == TIMER and sched.wake == 10.5
    assert sched.next(10.5, NO_STEP) == INFER and batch_items(sched) == ["a"]


def test_a_step_computed_and_logged_is_applied_before_waiting_inference() -> None:
    sched = make()
    sched.inference.add("a", 1, 0.0)
    assert sched.next(1.0, HEAD_READY) == APPLY
    assert len(sched.inference) == 1  # untouched


def test_inference_priority_runs_one_batch_then_training_never_starves() -> None:
    sched = make("inference")
    tq(sched).add("t0", 1, 0.0)
    tq(sched).add("t1", 1, 0.0)
    for i in range(6):
        sched.inference.add(f"i{i}", 1, 1.0)
    assert sched.next(2.0, NO_STEP) == INFER and batch_items(sched) == ["i0", "i1"]
    assert sched.yielded
    sched.inference.finish()
    assert sched.next(2.1, NO_STEP) == GROUP  # training waited once: it goes next
    assert not sched.yielded
    # The group's next step waits behind one more inference batch, then goes.
    assert sched.next(2.2, HEAD_WAITING) == INFER
    sched.inference.finish()
    assert sched.next(2.3, HEAD_WAITING) == PREPARE


def test_fifo_serves_the_older_queue_first() -> None:
    sched = make("fifo")
    tq(sched).add("t0", 1, 0.0)
    sched.inference.add("i0", 1, 1.0)
    assert sched.next(2.0, NO_STEP) == AGAIN  # the train queue grew: one more turn
    assert sched.next(2.0, NO_STEP) == GROUP
    sched = make("fifo")
    sched.inference.add("i0", 1, 0.0)
    tq(sched).add("t0", 1, 1.0)
    assert sched.next(2.0, NO_STEP) == INFER
    # A step in flight is older than anything queued behind it.
    sched.inference.finish()
    sched.inference.add("i1", 1, 3.0)
    assert sched.next(3.0, HEAD_WAITING) == PREPARE


def test_a_busy_head_step_lets_inference_run_without_yielding() -> None:
    sched = make("fifo")
    tq(sched).add("t0", 1, 0.0)  # queued behind the group
    sched.inference.add("i0", 1, 1.0)
    assert sched.next(1.0, HEAD_BUSY) == INFER and not sched.yielded
    sched.inference.finish()
    assert sched.next(1.1, HEAD_BUSY) == IDLE  # nothing can run: the step's callback kicks


def test_a_growing_train_queue_waits_a_turn_until_it_stops_or_fills() -> None:
    sched = make(max_batch=4)
    train = sched.training
    assert train is not None
    train.add("t0", 1, 0.0)
    assert sched.next(0.0, NO_STEP) == AGAIN  # grew since the last look: one more turn
    train.add("t1", 1, 0.0)
    assert sched.next(0.0, NO_STEP) == AGAIN
    assert sched.next(0.0, NO_STEP) == GROUP  # no arrivals this turn: go
    sched = make(max_batch=2)
    tq(sched).add("t0", 2, 0.0)
    assert sched.next(0.0, NO_STEP) == GROUP  # full: no point waiting


def test_inference_waiting_for_its_delay_lets_training_go_next() -> None:
    sched = make(max_batch=4, max_delay=1.0)
    sched.inference.add("i0", 1, 0.0)
    tq(sched).add("t0", 4, 0.0)
    # Priority "inference", but its batch is not due: training need not wait for it.
    assert sched.next(0.1, NO_STEP) == AGAIN and sched.yielded
    assert sched.next(0.1, NO_STEP) == GROUP


def run_all(sched: Scheduler[str, str], now: float) -> list[str]:
    """Drive the scheduler as the executor does, every piece of work finishing at once (a
    group's steps are computed, logged and applied right away); the order things finish in."""
    done: list[str] = []
    for _ in range(100):
        decision = sched.next(now, NO_STEP)
        if decision == INFER:
            done += batch_items(sched)
            sched.inference.finish()
        elif decision == GROUP:
            train = sched.training
            assert train is not None
            while len(train):
                micro = train.poll(now)
                assert micro is not None
                train.finish()
                done += [entry.item for entry in micro]
        elif decision == IDLE:
            return done
        else:
            assert decision == AGAIN
    raise AssertionError("never idle")


@pytest.mark.parametrize(
    ("priority", "expected"),
    [
        ("inference", ["i2", "i3", "t0", "t1", "i4", "i5", "i6", "i7"]),
        ("fifo", ["t0", "t1", "i2", "i3", "i4", "i5", "i6", "i7"]),
    ],
)
def test_the_order_of_a_mixed_queue(priority: Priority, expected: list[str]) -> None:
    # As tests/train/test_scheduling.py checks through a real executor and loop.
    sched = make(priority)
    for i, kind in enumerate(["t", "t", "i", "i", "i", "i", "i", "i"]):
        queue = sched.training if kind == "t" else sched.inference
        assert queue is not None
        queue.add(f"{kind}{i}", 1, float(i))
    assert run_all(sched, 10.0) == expected


def test_shared_is_the_one_encoder_all_jobs_have() -> None:
    a, b = object(), object()
    assert shared(iter([a, a])) is a
    assert shared(iter([a, b])) is None
    assert shared(iter([a, None])) is None
    assert shared(iter([None, a])) is None
    assert shared(iter([])) is None
