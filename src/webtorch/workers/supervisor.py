"""The master's decisions, sans-IO: which worker to start, signal or kill, and when to exit.

The shell (``master.py``) owns the processes, the pipes and the clock; it tells the
:class:`Supervisor` what happened (a worker started, became ready, beat, exited; a signal came;
time passed) with the time ``now`` it happened at, and carries out the actions it gets back.
So every rule below is tested with a fake clock, and the shell holds no policy:

- A worker that dies is started again after a delay that doubles with each failure in a row
  (``restart_delay`` up to ``restart_delay_max``); one that ran ``stable_after`` seconds before it
  died starts a new row. Every restart is counted and logged with its cause.
- A ready worker beats (its event loop writes to its pipe every tick). One whose last beat is older
  than ``heartbeat_timeout`` is stuck: SIGKILLed, and replaced like any worker that died. One that
  is not ready within ``start_timeout`` is killed the same way.
- Before every worker of the first start is ready, a worker that exits is a start that failed
  (a model that does not load): the others are stopped and the master exits with its status, as
  a single server does when its config is wrong.
- Stop (SIGTERM, SIGINT): every worker drains (SIGTERM); none is restarted; the master exits 0
  when all exited 0, else 1. A second stop, or ``limits.drain_timeout + stop_timeout``, SIGKILLs
  what is left (exit 1).
- Reload (SIGHUP, the shell has validated the file): every ready worker gets SIGHUP; one still
  starting gets it once ready if it started from an older config.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from enum import Enum
from typing import Final

log: Final = logging.getLogger("webtorch.workers")


@dataclass(frozen=True)
class Timing:
    """The supervisor's settings, in seconds (config's [server.master], limits.drain_timeout)."""

    heartbeat_timeout: float = 10.0
    start_timeout: float = 300.0
    restart_delay: float = 0.1
    restart_delay_max: float = 10.0
    stable_after: float = 30.0
    drain_timeout: float = 30.0
    stop_timeout: float = 10.0

    def backoff(self, failures: int) -> float:
        """The delay before restarting a worker that failed ``failures`` times in a row (>= 1)."""
        if self.restart_delay <= 0:
            return 0.0
        # Capped before it is computed: 2 ** failures grows past a float's range.
        doublings = min(failures - 1, 64)
        return float(min(self.restart_delay_max, self.restart_delay * 2**doublings))


# -- what the shell does ----------------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Start a worker process in ``slot`` (then tell :meth:`Supervisor.spawned` its pid)."""

    slot: int


@dataclass(frozen=True)
class Signal:
    pid: int
    signal: int


@dataclass(frozen=True)
class Announce:
    """Say which workers serve: every slot's pid at the first start (``replaced`` None), or
    the one slot whose new worker just became ready."""

    pids: tuple[int, ...]
    replaced: int | None = None


@dataclass(frozen=True)
class Exit:
    code: int


Action = Spawn | Signal | Announce | Exit


class State(Enum):
    STARTING = "starting"  # spawned, not ready yet
    READY = "ready"  # serving, beating
    WAITING = "waiting"  # dead, to be started again at restart_at
    GONE = "gone"  # exited during a stop (or a failed first start)


@dataclass
class Slot:
    index: int
    state: State = State.WAITING
    pid: int = 0
    started_at: float = 0.0
    ready_at: float | None = None
    beat_at: float = 0.0
    failures: int = 0  # in a row
    restart_at: float = 0.0
    generation: int = 0  # the config it started from (Supervisor.generation at its spawn)
    killed_for: str | None = None  # why the master SIGKILLed it, if it did
    cause: str = "exited"  # what a restart after it counts as: exited, stuck, start_timeout
    status: int | None = None  # its exit status once it exited during a stop


class Phase(Enum):
    STARTING = "starting"  # the first start: not every worker has been ready yet
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"


def describe(status: int) -> str:
    """An exit status as waitpid's ``waitstatus_to_exitcode`` gives it (negative: a signal)."""
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


class Supervisor:
    def __init__(self, count: int, timing: Timing) -> None:
        if count < 1:
            raise ValueError("at least one worker")
        self.timing = timing
        self.slots = [Slot(i) for i in range(count)]
        self.phase = Phase.STARTING
        self.restarts = 0  # workers started again after one died (or was killed)
        self.restarts_by = {"exited": 0, "stuck": 0, "start_timeout": 0}  # the same, by cause
        self.generation = 0  # reloads applied
        self.exit_code: int | None = None
        self._stop_deadline = 0.0
        self._escalated = False
        self._failed_start: int | None = None  # the status of a worker whose first start failed

    # -- events

    def start(self, now: float) -> list[Action]:
        """The first start: every slot spawns."""
        return [Spawn(slot.index) for slot in self.slots]

    def spawned(self, slot: int, pid: int, now: float) -> None:
        s = self.slots[slot]
        s.state, s.pid, s.started_at, s.beat_at = State.STARTING, pid, now, now
        s.ready_at, s.killed_for, s.generation = None, None, self.generation
        s.cause = "exited"

    def ready(self, pid: int, now: float) -> list[Action]:
        s = self._slot(pid)
        if s is None or s.state is not State.STARTING:
            return []
        s.state, s.ready_at, s.beat_at = State.READY, now, now
        actions: list[Action] = []
        if self.phase is Phase.STOPPING:
            return [Signal(pid, signal.SIGTERM)]  # ready after a stop began: it drains too
        if s.generation < self.generation:  # a reload came while it was starting
            s.generation = self.generation
            actions.append(Signal(pid, signal.SIGHUP))
        if self.phase is Phase.STARTING:
            if all(slot.state is State.READY for slot in self.slots):
                self.phase = Phase.RUNNING
                actions.append(Announce(tuple(slot.pid for slot in self.slots)))
        else:
            actions.append(Announce((pid,), replaced=s.index))
        return actions

    def beat(self, pid: int, now: float) -> None:
        s = self._slot(pid)
        if s is not None:
            s.beat_at = now

    def exited(self, pid: int, status: int, now: float) -> list[Action]:
        s = self._slot(pid)
        if s is None or s.state in (State.WAITING, State.GONE):
            return []
        why = s.killed_for or describe(status)
        s.killed_for = None
        if self.phase is Phase.STOPPING:
            s.state, s.status = State.GONE, status
            if status != 0:
                log.warning("worker %d (pid %d) %s while stopping", s.index, pid, why)
            return self._maybe_done()
        if self.phase is Phase.STARTING:
            # Its models did not load, or the port is taken: what a single server would exit
            # on. The others are stopped and the master exits with the same status.
            log.error("worker %d (pid %d) %s before it was ready: stopping", s.index, pid, why)
            s.state, s.status = State.GONE, status
            self._failed_start = status
            return self.stop(now)
        if s.ready_at is not None and now - s.ready_at >= self.timing.stable_after:
            s.failures = 0  # it had been serving long enough: a new row of failures
        s.failures += 1
        delay = self.timing.backoff(s.failures)
        s.state, s.restart_at = State.WAITING, now + delay
        self.restarts += 1
        self.restarts_by[s.cause] += 1
        log.warning(
            "worker %d (pid %d) %s; starting another in %.1f s (restart %d; %d in a row)",
            s.index,
            pid,
            why,
            delay,
            self.restarts,
            s.failures,
        )
        return self.tick(now) if delay == 0 else []

    def stop(self, now: float) -> list[Action]:
        """SIGTERM or SIGINT: drain every worker; a second one escalates."""
        if self.phase is Phase.DONE:
            return []
        if self.phase is Phase.STOPPING:
            if self._escalated:
                return []
            log.warning("stopping again: killing the workers that still drain")
            return self._escalate()
        self.phase = Phase.STOPPING
        self._stop_deadline = now + self.timing.drain_timeout + self.timing.stop_timeout
        actions: list[Action] = []
        for s in self.slots:
            if s.state in (State.STARTING, State.READY):
                actions.append(Signal(s.pid, signal.SIGTERM))
            elif s.state is State.WAITING:
                s.state, s.status = State.GONE, 0  # not restarted: nothing to drain
        return actions + self._maybe_done()

    def reload(self) -> list[Action]:
        """A new config (validated by the shell): every ready worker reloads it; one still
        starting does once it is ready (:meth:`ready`), one started later starts from it."""
        if self.phase in (Phase.STOPPING, Phase.DONE):
            return []
        self.generation += 1
        actions: list[Action] = []
        for s in self.slots:
            if s.state is State.READY:
                s.generation = self.generation
                actions.append(Signal(s.pid, signal.SIGHUP))
        return actions

    def forward(self, sig: int) -> list[Action]:
        """``sig`` (SIGUSR1: reopen logs) to every worker that runs."""
        return [Signal(s.pid, sig) for s in self.slots if s.state in (State.STARTING, State.READY)]

    def tick(self, now: float) -> list[Action]:
        """Time passed: restarts that are due, stuck or slow workers, a drain that took too long."""
        actions: list[Action] = []
        if self.phase is Phase.STOPPING:
            if now >= self._stop_deadline and not self._escalated:
                log.warning(
                    "workers still draining after %.0f s: killing them",
                    self.timing.drain_timeout + self.timing.stop_timeout,
                )
                actions += self._escalate()
            return actions
        if self.phase is Phase.DONE:
            return actions
        t = self.timing
        for s in self.slots:
            if s.killed_for is not None:
                continue  # SIGKILLed: waiting for its exit
            if s.state is State.WAITING and now >= s.restart_at:
                actions.append(Spawn(s.index))
            elif s.state is State.READY and now - s.beat_at > t.heartbeat_timeout:
                s.cause = "stuck"
                s.killed_for = (
                    f"was stuck (no heartbeat for {now - s.beat_at:.1f} s, more than "
                    f"heartbeat_timeout {t.heartbeat_timeout:g} s) and was killed"
                )
                log.error("worker %d (pid %d) %s", s.index, s.pid, s.killed_for)
                actions.append(Signal(s.pid, signal.SIGKILL))
            elif s.state is State.STARTING and now - s.started_at > t.start_timeout:
                s.cause = "start_timeout"
                s.killed_for = f"was not ready within start_timeout {t.start_timeout:g} s"
                log.error("worker %d (pid %d) %s: killing it", s.index, s.pid, s.killed_for)
                actions.append(Signal(s.pid, signal.SIGKILL))
        return actions

    def deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (None: only an event can change that)."""
        if self.phase is Phase.DONE:
            return None
        if self.phase is Phase.STOPPING:
            return None if self._escalated else self._stop_deadline
        t = self.timing
        times = []
        for s in self.slots:
            if s.killed_for is not None:
                continue
            if s.state is State.WAITING:
                times.append(s.restart_at)
            elif s.state is State.READY:
                times.append(s.beat_at + t.heartbeat_timeout)
            elif s.state is State.STARTING:
                times.append(s.started_at + t.start_timeout)
        return min(times, default=None)

    # -- views

    def live(self) -> list[Slot]:
        """Slots with a process now (starting or ready)."""
        return [s for s in self.slots if s.state in (State.STARTING, State.READY)]

    # -- inside

    def _slot(self, pid: int) -> Slot | None:
        for s in self.slots:
            if s.pid == pid and s.state is not State.WAITING:
                return s
        return None

    def _escalate(self) -> list[Action]:
        self._escalated = True
        return [Signal(s.pid, signal.SIGKILL) for s in self.live()]

    def _maybe_done(self) -> list[Action]:
        if self.live():
            return []
        self.phase = Phase.DONE
        if self._failed_start is not None:
            code = self._failed_start if self._failed_start > 0 else 1
        else:
            clean = not self._escalated and all(s.status == 0 for s in self.slots)
            code = 0 if clean else 1
        self.exit_code = code
        return [Exit(code)]
