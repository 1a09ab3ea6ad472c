"""The master's rules (workers/supervisor.py), sans-IO, on a fake clock: restarts and their
backoff, heartbeats, a failed first start, stop and its escalation, reloads."""

from __future__ import annotations

import logging
import signal

import pytest

from webtorch.workers.supervisor import (
    Announce,
    Exit,
    Phase,
    Signal,
    Spawn,
    State,
    Supervisor,
    Timing,
)

TIMING = Timing(
    heartbeat_timeout=5.0,
    start_timeout=60.0,
    restart_delay=0.5,
    restart_delay_max=4.0,
    stable_after=30.0,
    drain_timeout=10.0,
    stop_timeout=2.0,
)


def running(count: int = 2, now: float = 0.0) -> Supervisor:
    """Every worker spawned (pids 100, 101, ...) and ready at ``now``."""
    sup = Supervisor(count, TIMING)
    assert sup.start(now) == [Spawn(i) for i in range(count)]
    for i in range(count):
        sup.spawned(i, 100 + i, now)
    for i in range(count - 1):
        assert sup.ready(100 + i, now) == []
    assert sup.ready(100 + count - 1, now) == [Announce(tuple(100 + i for i in range(count)))]
    assert sup.phase is Phase.RUNNING
    return sup


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [TIMING.backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert TIMING.backoff(10_000) == 4.0  # no overflow
    assert Timing(restart_delay=0).backoff(5) == 0.0


def test_a_dead_worker_is_restarted_after_a_growing_delay(caplog: pytest.LogCaptureFixture) -> None:
    sup = running()
    with caplog.at_level(logging.WARNING, "webtorch.workers"):
        assert sup.exited(100, -9, now=1.0) == []
    assert "worker 0 (pid 100) was killed by SIGKILL" in caplog.text
    assert "restart 1; 1 in a row" in caplog.text
    assert sup.deadline() == 1.5
    assert sup.tick(1.49) == []
    assert sup.tick(1.5) == [Spawn(0)]
    sup.spawned(0, 200, 1.5)
    assert sup.ready(200, 2.0) == [Announce((200,), replaced=0)]
    # It dies again soon after: the delay doubles.
    assert sup.exited(200, 1, now=3.0) == []
    assert sup.slots[0].restart_at == 4.0
    assert sup.restarts == 2
    assert sup.slots[1].state is State.READY  # the other one never noticed


def test_a_worker_that_ran_long_enough_starts_a_new_row() -> None:
    sup = running()
    for n, pid in enumerate([100, 200, 300]):
        sup.exited(pid, 1, now=10.0 * n)
        sup.beat(101, 10.0 * n + 5)
        assert sup.tick(10.0 * n + 5) == [Spawn(0)]
        sup.spawned(0, pid + 100, 10.0 * n + 5)
        sup.ready(pid + 100, 10.0 * n + 5)
    assert sup.slots[0].failures == 3
    # Ready at 25, dies at 55 (30 s: stable_after): the row starts over at the first delay.
    sup.exited(400, 1, now=55.0)
    assert sup.slots[0].failures == 1
    assert sup.slots[0].restart_at == 55.5


def test_a_worker_without_heartbeat_is_killed_and_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup = running()
    sup.beat(100, 3.0)
    sup.beat(101, 4.0)
    assert sup.deadline() == 8.0
    assert sup.tick(8.0) == []  # exactly the timeout: not yet
    with caplog.at_level(logging.ERROR, "webtorch.workers"):
        assert sup.tick(8.1) == [Signal(100, signal.SIGKILL)]
    assert "worker 0 (pid 100) was stuck (no heartbeat for 5.1 s" in caplog.text
    assert sup.tick(8.5) == []  # killed once; waiting for its exit
    caplog.clear()
    with caplog.at_level(logging.WARNING, "webtorch.workers"):
        sup.exited(100, -9, now=8.6)
    assert "was stuck" in caplog.text  # the restart says why it died
    assert sup.restarts_by == {"exited": 0, "stuck": 1, "start_timeout": 0}
    # Both due at 9.1: 0's restart, and 101, which last beat at 4.0.
    assert sup.tick(9.1) == [Spawn(0), Signal(101, signal.SIGKILL)]


def test_a_worker_that_does_not_get_ready_in_time_is_killed() -> None:
    sup = running()
    sup.exited(100, 1, now=0.0)
    assert sup.tick(0.5) == [Spawn(0)]
    sup.spawned(0, 200, 0.5)
    sup.beat(101, 60.0)
    sup.beat(200, 60.0)  # a worker beats only once ready: a beat before does not count
    assert sup.tick(60.5) == []
    assert sup.tick(60.6) == [Signal(200, signal.SIGKILL)]
    sup.exited(200, -9, now=60.7)
    assert sup.restarts_by == {"exited": 1, "stuck": 0, "start_timeout": 1}


def test_a_failed_first_start_stops_the_others_with_its_status() -> None:
    sup = Supervisor(3, TIMING)
    sup.start(0.0)
    for i in range(3):
        sup.spawned(i, 100 + i, 0.0)
    sup.ready(100, 1.0)
    # Worker 1's model does not load: it exits 2 before it is ready.
    assert sup.exited(101, 2, now=2.0) == [Signal(100, signal.SIGTERM), Signal(102, signal.SIGTERM)]
    assert sup.exited(100, 0, now=2.1) == []
    assert sup.exited(102, 0, now=2.2) == [Exit(2)]
    assert sup.exit_code == 2


def test_stop_drains_every_worker_and_exits_0_when_all_did() -> None:
    sup = running(3)
    sup.exited(102, -9, now=1.0)  # waiting for its restart: not started again
    assert sup.stop(2.0) == [Signal(100, signal.SIGTERM), Signal(101, signal.SIGTERM)]
    assert sup.tick(2.5) == []
    assert sup.exited(100, 0, now=3.0) == []
    assert sup.exited(101, 0, now=4.0) == [Exit(0)]
    assert sup.deadline() is None


def test_a_worker_that_fails_its_drain_makes_the_exit_status_1() -> None:
    sup = running()
    sup.stop(0.0)
    sup.exited(100, 0, now=1.0)
    assert sup.exited(101, 1, now=1.0) == [Exit(1)]


def test_a_second_stop_or_the_drain_timeout_kills_what_is_left() -> None:
    sup = running()
    sup.stop(0.0)
    assert sup.stop(1.0) == [Signal(100, signal.SIGKILL), Signal(101, signal.SIGKILL)]
    assert sup.stop(1.5) == []
    sup.exited(100, -9, now=2.0)
    assert sup.exited(101, -9, now=2.0) == [Exit(1)]

    sup = running()
    sup.stop(0.0)
    assert sup.deadline() == 12.0  # drain_timeout + stop_timeout
    assert sup.tick(11.9) == []
    assert sup.tick(12.0) == [Signal(100, signal.SIGKILL), Signal(101, signal.SIGKILL)]
    sup.exited(100, 0, now=12.1)  # drained just in time, but the escalation happened
    assert sup.exited(101, -9, now=12.1) == [Exit(1)]


def test_no_heartbeat_kills_while_draining() -> None:
    sup = running()
    sup.stop(0.0)
    assert sup.tick(11.0) == []  # a long request drains: its loop may beat late


def test_reload_signals_ready_workers_and_a_starting_one_once_ready() -> None:
    sup = running(3)
    sup.exited(102, 1, now=1.0)
    sup.tick(1.5)
    sup.spawned(2, 300, 1.5)  # starting from the config before the reload
    assert sup.reload() == [Signal(100, signal.SIGHUP), Signal(101, signal.SIGHUP)]
    assert sup.ready(300, 2.0) == [Signal(300, signal.SIGHUP), Announce((300,), replaced=2)]
    # One started after the reload starts from the new config: no SIGHUP.
    sup.exited(300, 1, now=3.0)
    sup.tick(4.0)
    sup.spawned(2, 400, 4.0)
    assert sup.ready(400, 4.1) == [Announce((400,), replaced=2)]


def test_reopen_reaches_every_running_worker() -> None:
    sup = running()
    sup.exited(101, 1, now=1.0)
    sup.tick(1.5)
    sup.spawned(1, 200, 1.5)
    assert sup.forward(signal.SIGUSR1) == [
        Signal(100, signal.SIGUSR1),
        Signal(200, signal.SIGUSR1),
    ]


def test_a_worker_ready_after_a_stop_began_drains_too() -> None:
    sup = running()
    sup.exited(100, 1, now=1.0)
    sup.tick(2.0)
    sup.spawned(0, 200, 2.0)
    assert sup.stop(3.0) == [Signal(200, signal.SIGTERM), Signal(101, signal.SIGTERM)]
    assert sup.ready(200, 3.5) == [Signal(200, signal.SIGTERM)]
    assert sup.reload() == []


def test_unknown_pids_are_ignored() -> None:
    sup = running()
    assert sup.exited(999, 0, now=1.0) == []
    assert sup.ready(999, 1.0) == []
    sup.beat(999, 1.0)
