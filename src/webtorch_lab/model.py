"""The simulated upstream's queueing model, sans-IO: requests and time in, decisions out.

An upstream has ``slots`` requests in service at once and a FIFO queue behind them. A request's
service time is drawn from a distribution, stretched by any fault active when it starts, plus a
cold-load penalty when the upstream has not served its key recently, plus a cost per KiB of
request body. Scripted faults change the answers over time. The I/O shell (``sim.py``) calls
``arrive``, ``complete`` and ``cancel`` with ``now`` (seconds since the run's start, negative
during the warm-up) and acts on what they return; nothing here reads a clock or a socket.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Literal

# The standard normal's 99th percentile: a lognormal's p99 is median * exp(Z99 * sigma).
Z99 = 2.3263478740408408

Distribution = Literal["fixed", "exponential", "lognormal"]
FaultKind = Literal["slow", "delay", "error", "blackhole", "down"]


@dataclass(frozen=True, slots=True)
class ServiceTime:
    """A service-time distribution given by its median (and its p99 for a lognormal)."""

    dist: Distribution = "lognormal"
    median: float = 0.01
    p99: float | None = None  # lognormal only; None: twice the median

    @property
    def sigma(self) -> float:
        p99 = self.p99 if self.p99 is not None else 2.0 * self.median
        return math.log(p99 / self.median) / Z99

    @property
    def mean(self) -> float:
        if self.dist == "fixed":
            return self.median
        if self.dist == "exponential":
            return self.median / math.log(2.0)
        return self.median * math.exp(self.sigma**2 / 2.0)

    def sample(self, rng: random.Random) -> float:
        if self.dist == "fixed":
            return self.median
        if self.dist == "exponential":
            return rng.expovariate(math.log(2.0) / self.median)
        return self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0))


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted fault, active from ``start`` (inclusive) to ``end`` (exclusive), in seconds
    since the run's start.

    slow: service times x ``factor``; delay: service times + ``delay`` seconds (both still hold
    a slot); error: every request answered ``status`` after ``error_time`` seconds, holding no
    slot (health checks still pass: the node looks alive); blackhole: requests are read and never
    answered, health checks included; down: the port refuses connections and open ones are cut.
    """

    kind: FaultKind
    start: float
    end: float = math.inf
    factor: float = 1.0
    delay: float = 0.0
    status: int = 503
    error_time: float = 0.001
    # slow / delay: the share of requests it hits (each drawn on its own), e.g. an upstream
    # that is very slow on 3% of its requests: a heavy tail under a fast median.
    share: float = 1.0

    def active(self, now: float) -> bool:
        return self.start <= now < self.end


@dataclass(frozen=True, slots=True)
class Effect:
    """What the faults active at one moment add up to."""

    factor: float = 1.0
    delay: float = 0.0
    error: Fault | None = None  # the error fault in force, if any
    blackhole: bool = False
    down: bool = False
    partial: tuple[Fault, ...] = ()  # slow / delay faults that hit a share of requests


HEALTHY = Effect()


@dataclass(frozen=True, slots=True)
class FaultSchedule:
    faults: tuple[Fault, ...] = ()

    def at(self, now: float) -> Effect:
        active = [f for f in self.faults if f.active(now)]
        if not active:
            return HEALTHY
        factor, delay = 1.0, 0.0
        error: Fault | None = None
        partial = tuple(f for f in active if f.share < 1.0 and f.kind in ("slow", "delay"))
        for f in active:
            if f.share < 1.0 and f.kind in ("slow", "delay"):
                continue
            if f.kind == "slow":
                factor *= f.factor
            elif f.kind == "delay":
                delay += f.delay
            elif f.kind == "error" and error is None:
                error = f
        return Effect(
            factor=factor,
            delay=delay,
            error=error,
            blackhole=any(f.kind == "blackhole" for f in active),
            down=any(f.kind == "down" for f in active),
            partial=partial,
        )

    def down_windows(self) -> list[tuple[float, float]]:
        """The windows in which the port is closed, overlaps merged, in order."""
        spans = sorted((f.start, f.end) for f in self.faults if f.kind == "down")
        merged: list[tuple[float, float]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged


@dataclass(frozen=True, slots=True)
class UpstreamParams:
    """The static description of one simulated upstream."""

    name: str
    slots: int = 8
    service: ServiceTime = field(default_factory=ServiceTime)
    cold_penalty: float = 0.0  # seconds added when the key is not warm
    warm_window: float = 0.0  # a key unused this long is cold again; 0: never by time
    max_warm: int = 0  # keys kept warm at once (least recently used go cold); 0: no limit
    cost_per_kib: float = 0.0  # seconds added per KiB of request body
    max_queue: int = 0  # requests waiting beyond the slots; more are answered 503; 0: no limit
    faults: FaultSchedule = field(default_factory=FaultSchedule)

    @property
    def capacity(self) -> float:
        """Requests per second it serves when healthy and warm, for requests without a body."""
        return self.slots / self.service.mean


# --- decisions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer request ``rid`` with ``status`` at time ``at``."""

    rid: int
    at: float
    status: int = 200
    cold: bool = False


@dataclass(frozen=True, slots=True)
class Queued:
    rid: int


@dataclass(frozen=True, slots=True)
class Hold:
    """A black hole: never answer."""

    rid: int


Action = Respond | Queued | Hold


@dataclass(slots=True)
class _Waiting:
    rid: int
    key: str | None
    size: int
    arrived: float


@dataclass
class UpstreamStats:
    """Counters of work requests (health checks and probes are not counted)."""

    bucket: float
    arrivals: dict[int, int] = field(default_factory=dict)  # bucket index -> requests
    requests: int = 0  # arrived at or after the run's start
    statuses: dict[int, int] = field(default_factory=dict)
    cold_loads: int = 0
    cancelled: int = 0  # the client left while it was queued or held
    held: int = 0  # black-holed
    max_queue: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "bucket": self.bucket,
            "arrivals": {str(k): v for k, v in sorted(self.arrivals.items())},
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "cold_loads": self.cold_loads,
            "cancelled": self.cancelled,
            "held": self.held,
            "max_queue": self.max_queue,
        }


RECENT = 64  # completions the load probe's latency is the median of


class UpstreamModel:
    """K slots, a FIFO queue, warm keys and faults; see the module's docstring."""

    def __init__(self, params: UpstreamParams, rng: random.Random, bucket: float = 0.1) -> None:
        self.params = params
        self.rng = rng
        self.stats = UpstreamStats(bucket)
        self.busy = 0  # slots in use
        self.queue: OrderedDict[int, _Waiting] = OrderedDict()
        self.held: set[int] = set()
        self.in_service: dict[int, float] = {}  # rid -> arrival time
        self.warm: OrderedDict[str, float] = OrderedDict()  # key -> last served at
        self.recent: deque[float] = deque(maxlen=RECENT)  # arrival-to-answer times

    # -- events -----------------------------------------------------------------------------

    def arrive(self, rid: int, now: float, key: str | None = None, size: int = 0) -> Action:
        self._count(now)
        effect = self.params.faults.at(now)
        if effect.blackhole:
            self.held.add(rid)
            if now >= 0:
                self.stats.held += 1
            return Hold(rid)
        if effect.error is not None:
            return self._answer(Respond(rid, now + effect.error.error_time, effect.error.status))
        waiting = _Waiting(rid, key, size, now)
        if self.busy < self.params.slots:
            return self._start(waiting, now, effect)
        if 0 < self.params.max_queue <= len(self.queue):
            return self._answer(Respond(rid, now, 503))
        self.queue[rid] = waiting
        self.stats.max_queue = max(self.stats.max_queue, len(self.queue))
        return Queued(rid)

    def complete(self, rid: int, now: float) -> list[Respond]:
        """Request ``rid``'s service ended (its Respond's time came): free its slot and start
        queued requests on it. Returns the requests that start now."""
        arrived = self.in_service.pop(rid, None)
        if arrived is None:
            return []
        self.recent.append(now - arrived)
        self.busy -= 1
        started: list[Respond] = []
        while self.queue and self.busy < self.params.slots:
            _, waiting = self.queue.popitem(last=False)
            action = self._start(waiting, now, self.params.faults.at(now))
            started.append(action)
        return started

    def cancel(self, rid: int) -> None:
        """The client went away: a queued or held request is forgotten; one in service runs to
        its end (the work cannot be taken back) and its answer is dropped by the shell."""
        if self.queue.pop(rid, None) is not None or rid in self.held:
            self.held.discard(rid)
            self.stats.cancelled += 1

    def load(self) -> tuple[int, float]:
        """``(inflight, latency)`` for the load probe: requests in service, queued or held, and
        the median of the recent arrival-to-answer times (0.0 before any)."""
        inflight = self.busy + len(self.queue) + len(self.held)
        if not self.recent:
            return inflight, 0.0
        ordered = sorted(self.recent)
        return inflight, ordered[len(ordered) // 2]

    def healthy(self, now: float) -> bool:
        """Whether ``GET /health`` is answered (200) at ``now``."""
        effect = self.params.faults.at(now)
        return not (effect.blackhole or effect.down)

    # -- internals --------------------------------------------------------------------------

    def _count(self, now: float) -> None:
        if now < 0:
            return
        self.stats.requests += 1
        index = int(now / self.stats.bucket)
        self.stats.arrivals[index] = self.stats.arrivals.get(index, 0) + 1

    def _answer(self, respond: Respond) -> Respond:
        if respond.at >= 0:
            statuses = self.stats.statuses
            statuses[respond.status] = statuses.get(respond.status, 0) + 1
        return respond

    def _start(self, waiting: _Waiting, now: float, effect: Effect) -> Respond:
        params = self.params
        service = params.service.sample(self.rng) * effect.factor + effect.delay
        for f in effect.partial:
            if self.rng.random() < f.share:
                service = service * f.factor + f.delay
        cold = self._touch(waiting.key, now)
        if cold:
            service += params.cold_penalty
            if now >= 0:
                self.stats.cold_loads += 1
        service += params.cost_per_kib * waiting.size / 1024.0
        self.busy += 1
        self.in_service[waiting.rid] = waiting.arrived
        return self._answer(Respond(waiting.rid, now + service, 200, cold))

    def _touch(self, key: str | None, now: float) -> bool:
        """Mark ``key`` served at ``now``; True when it was cold (and a penalty applies)."""
        params = self.params
        if key is None or params.cold_penalty <= 0:
            return False
        last = self.warm.pop(key, None)
        cold = last is None or (params.warm_window > 0 and now - last > params.warm_window)
        self.warm[key] = now
        if params.max_warm > 0:
            while len(self.warm) > params.max_warm:
                self.warm.popitem(last=False)
        return cold
