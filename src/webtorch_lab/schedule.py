"""The load generator's plan, sans-IO: when each request is due and what it carries.

Arrivals are a Poisson process whose rate may ramp linearly over the measured period (drawn by
thinning, so the ramp is exact); each request gets a key from a Zipf distribution over ``keys``
names and a body size from a weighted list. The whole plan is drawn up front from one seeded
generator, so a scenario's load is the same for every balancer it compares.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Planned:
    t: float  # intended send time, seconds since the run's start (negative: warm-up)
    key: str | None
    size: int  # request body bytes; 0: a GET


@dataclass(frozen=True, slots=True)
class LoadShape:
    rate: float  # requests per second at the start (and through the warm-up)
    duration: float  # seconds measured
    ramp_to: float | None = None  # rate at the end of the measured period; None: constant
    warmup: float = 0.0  # seconds of load before the measured period

    def rate_at(self, t: float) -> float:
        if self.ramp_to is None or t <= 0 or self.duration <= 0:
            return self.rate
        return self.rate + (self.ramp_to - self.rate) * min(t, self.duration) / self.duration


def key_name(rank: int) -> str:
    return f"key-{rank:02d}"


class KeyChooser:
    """Zipf over ``count`` keys: key of rank k (0 = most popular) has weight 1 / (k + 1)^s."""

    def __init__(self, count: int, exponent: float) -> None:
        weights = [1.0 / math.pow(k + 1, exponent) for k in range(count)]
        self.cumulative = list(itertools.accumulate(weights))
        self.names = [key_name(k) for k in range(count)]

    def probability(self, rank: int) -> float:
        total = self.cumulative[-1]
        previous = self.cumulative[rank - 1] if rank else 0.0
        return (self.cumulative[rank] - previous) / total

    def choose(self, rng: random.Random) -> str:
        x = rng.random() * self.cumulative[-1]
        return self.names[min(bisect.bisect_right(self.cumulative, x), len(self.names) - 1)]


class SizeChooser:
    def __init__(self, sizes: Sequence[tuple[int, float]]) -> None:
        self.sizes = [size for size, _ in sizes]
        self.cumulative = list(itertools.accumulate(weight for _, weight in sizes))

    def choose(self, rng: random.Random) -> int:
        if len(self.sizes) == 1:
            return self.sizes[0]
        x = rng.random() * self.cumulative[-1]
        return self.sizes[min(bisect.bisect_right(self.cumulative, x), len(self.sizes) - 1)]


def arrival_times(shape: LoadShape, rng: random.Random) -> Iterator[float]:
    """Poisson arrival times from ``-warmup`` to ``duration``, by thinning at the peak rate."""
    peak = max(shape.rate, shape.ramp_to or 0.0)
    if peak <= 0:
        return
    t = -shape.warmup
    while True:
        t += rng.expovariate(peak)
        if t >= shape.duration:
            return
        if rng.random() * peak < shape.rate_at(t):
            yield t


def plan(
    shape: LoadShape,
    seed: int,
    keys: KeyChooser | None = None,
    sizes: SizeChooser | None = None,
) -> list[Planned]:
    """Every request of a run, in order. Times, keys and sizes come from separate generators
    seeded from ``seed``, so adding keys to a scenario does not move its arrival times."""
    times = random.Random(f"{seed}:times")
    key_rng = random.Random(f"{seed}:keys")
    size_rng = random.Random(f"{seed}:sizes")
    return [
        Planned(
            t,
            keys.choose(key_rng) if keys is not None else None,
            sizes.choose(size_rng) if sizes is not None else 0,
        )
        for t in arrival_times(shape, times)
    ]
