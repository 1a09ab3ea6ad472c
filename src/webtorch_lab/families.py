"""Scenario families with randomised parameters: traffic the balancers were never tuned on.

The shipped scenarios (``scenarios/``) are a handful of fixed cases, and a policy tuned on them
can win there and lose elsewhere (issue 23). Here a *family* is a kind of trouble (an upstream
very slow on a share of its requests, periodic stalls, a gradual degradation...) and a *case* is
one draw of it: its parameters (which upstream, how slow, how often, when) and the load's seed
come from ``random.Random(f"{family}:{seed}")``, so a (family, seed) pair names one case for
good. ``split`` keeps seeds and whole families apart: tuning uses ``TUNING`` families on seeds
below ``HELD_OUT_SEED``; the report uses the held-out families on any seed and the tuning
families on seeds from ``HELD_OUT_SEED`` up.

Cases run on the offline simulator (``offline.py``: the policy, sans-IO, against the upstream
model on a fake clock, with the client's timeout), so a few hundred runs take minutes on one
core. Every case has four upstreams of the same nominal size and a load at ``utilisation`` of
their healthy capacity.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from webtorch_lab.model import Fault, FaultSchedule, ServiceTime, UpstreamParams
from webtorch_lab.schedule import KeyChooser, LoadShape, Planned, SizeChooser, plan

UPSTREAMS = 4
DURATION = 10.0  # seconds measured
WARMUP = 1.0
TIMEOUT = 1.0  # the client's, seconds
HELD_OUT_SEED = 1000  # tuning seeds are below, held-out seeds from here up


@dataclass(frozen=True)
class Case:
    family: str
    seed: int
    upstreams: list[UpstreamParams]
    load: list[Planned]
    timeout: float
    keyed: bool  # requests carry a key (x-key) whose warmth matters
    note: str  # the drawn parameters, for the report


def _base(rng: random.Random) -> tuple[UpstreamParams, float]:
    """A healthy upstream and the load rate for ``UPSTREAMS`` of them."""
    slots = rng.choice((2, 4, 4, 8))
    median = rng.uniform(0.005, 0.02)
    service = ServiceTime("lognormal", median, median * rng.uniform(2.0, 4.0))
    params = UpstreamParams("up", slots=slots, service=service)
    utilisation = rng.uniform(0.4, 0.65)
    rate = utilisation * UPSTREAMS * params.capacity
    return params, min(rate, 900.0)  # bounded: a case stays a second or two of CPU


Faults = list[tuple[Fault, ...]]  # per upstream


def _none() -> Faults:
    return [() for _ in range(UPSTREAMS)]


def heavy_tail(rng: random.Random, base: UpstreamParams) -> tuple[Faults, str]:
    """One upstream is very slow on a share of its requests (fast median, heavy tail)."""
    share = rng.uniform(0.02, 0.1)
    delay = rng.uniform(0.3, 1.2)
    faults = _none()
    faults[rng.randrange(UPSTREAMS)] = (Fault("delay", 0.0, delay=delay, share=share),)
    return faults, f"share={share:.3f} delay={delay:.2f}s"


def stalls(rng: random.Random, base: UpstreamParams) -> tuple[Faults, str]:
    """One upstream stalls periodically (a GC pause, a noisy neighbour)."""
    period = rng.uniform(1.0, 3.0)
    length = rng.uniform(0.1, 0.4)
    t, spans = rng.uniform(0.0, period), []
    while t < DURATION:
        spans.append(Fault("delay", t, t + length, delay=length))
        t += period
    faults = _none()
    faults[rng.randrange(UPSTREAMS)] = tuple(spans)
    return faults, f"period={period:.2f}s stall={length:.2f}s"


def degradation(rng: random.Random, base: UpstreamParams) -> tuple[Faults, str]:
    """One upstream slows down gradually, to ``worst`` x its service time at the end."""
    worst = rng.uniform(3.0, 12.0)
    steps = 10
    faults = _none()
    step = DURATION / steps
    faults[rng.randrange(UPSTREAMS)] = tuple(
        Fault("slow", step * i, step * (i + 1) if i < steps else math.inf, factor=worst ** (i / 10))
        for i in range(1, steps + 1)
    )
    return faults, f"worst={worst:.1f}x"


def flapping(rng: random.Random, base: UpstreamParams) -> tuple[Faults, str]:
    """One upstream fails fast (503) on and off."""
    period = rng.uniform(0.5, 3.0)
    duty = rng.uniform(0.3, 0.6)
    t, spans = rng.uniform(0.0, period), []
    while t < DURATION:
        spans.append(Fault("error", t, t + period * duty))
        t += period
    faults = _none()
    faults[rng.randrange(UPSTREAMS)] = tuple(spans)
    return faults, f"period={period:.2f}s duty={duty:.2f}"


def capacity_drop(rng: random.Random, base: UpstreamParams) -> tuple[Faults, str]:
    """One upstream serves ``factor`` x slower for a while, then recovers."""
    factor = rng.uniform(3.0, 10.0)
    start = rng.uniform(1.0, 4.0)
    end = start + rng.uniform(2.0, 4.0)
    faults = _none()
    faults[rng.randrange(UPSTREAMS)] = (Fault("slow", start, end, factor=factor),)
    return faults, f"factor={factor:.1f}x {start:.1f}-{end:.1f}s"


def correlated(rng: random.Random, base: UpstreamParams) -> tuple[Faults, str]:
    """Two upstreams slow down together, then recover."""
    factor = rng.uniform(3.0, 8.0)
    start = rng.uniform(1.0, 4.0)
    end = start + rng.uniform(2.0, 4.0)
    faults = _none()
    for index in rng.sample(range(UPSTREAMS), 2):
        faults[index] = (Fault("slow", start, end, factor=factor),)
    return faults, f"two x{factor:.1f} {start:.1f}-{end:.1f}s"


FaultFamily = Callable[[random.Random, UpstreamParams], tuple[Faults, str]]
FAULTS: dict[str, FaultFamily] = {
    "heavy_tail": heavy_tail,
    "stalls": stalls,
    "degradation": degradation,
    "flapping": flapping,
    "capacity_drop": capacity_drop,
    "correlated": correlated,
}
FAMILIES = (*FAULTS, "request_cost", "key_warmth")
# Never used for tuning: two whole families (one fault kind the issue saw lost, one where
# learning should pay), and every seed from HELD_OUT_SEED up of the others.
HELD_OUT_FAMILIES = ("stalls", "key_warmth")
TUNING = tuple(f for f in FAMILIES if f not in HELD_OUT_FAMILIES)


def make_case(family: str, seed: int) -> Case:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    rng = random.Random(f"{family}:{seed}")
    base, rate = _base(rng)
    shape = LoadShape(rate, DURATION, warmup=WARMUP)
    keys: KeyChooser | None = None
    sizes: SizeChooser | None = None
    per_upstream: list[UpstreamParams]
    if family in FAULTS:
        faults, note = FAULTS[family](rng, base)
        per_upstream = [
            replace(base, name=f"up-{i}", faults=FaultSchedule(f)) for i, f in enumerate(faults)
        ]
    elif family == "request_cost":
        # Bodies of mixed sizes; one or two upstreams pay much more per KiB (a slower disk, no
        # accelerator for the decode): the cost depends on the request and the upstream.
        slow_kib = rng.uniform(0.1e-3, 0.4e-3)
        fast_kib = slow_kib / rng.uniform(5.0, 20.0)
        slow = set(rng.sample(range(UPSTREAMS), rng.choice((1, 2))))
        per_upstream = [
            replace(base, name=f"up-{i}", cost_per_kib=slow_kib if i in slow else fast_kib)
            for i in range(UPSTREAMS)
        ]
        big = rng.choice((128, 256, 512)) * 1024
        sizes = SizeChooser([(0, 6.0), (4096, 3.0), (big, 1.0)])
        # Big bodies add work: keep the load near the drawn utilisation of the fast upstreams.
        shape = LoadShape(rate * 0.7, DURATION, warmup=WARMUP)
        note = f"slow={len(slow)} {slow_kib * 1e3:.2f}ms/KiB big={big // 1024}KiB"
    else:  # key_warmth
        penalty = rng.uniform(0.05, 0.3)
        held = rng.choice((4, 6, 8))
        count = rng.choice((12, 16, 24))
        per_upstream = [
            replace(base, name=f"up-{i}", cold_penalty=penalty, max_warm=held)
            for i in range(UPSTREAMS)
        ]
        keys = KeyChooser(count, rng.uniform(0.8, 1.2))
        note = f"keys={count} held={held} cold={penalty * 1e3:.0f}ms"
    load = plan(shape, seed, keys, sizes)
    return Case(family, seed, per_upstream, load, TIMEOUT, keys is not None, note)


def split(seeds: int, held_out: bool) -> list[tuple[str, int]]:
    """The (family, seed) pairs of one side: ``seeds`` per family."""
    if not held_out:
        return [(f, s) for f in TUNING for s in range(seeds)]
    return [(f, HELD_OUT_SEED + s) for f in FAMILIES for s in range(seeds)]
