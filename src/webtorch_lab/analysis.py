"""From one run's records and upstream counters to the numbers in the report; no I/O.

- Latency percentiles count every request, a failed one (non-2xx, error, or no answer within
  the timeout) as infinitely slow: a balancer cannot look fast by failing fast.
- Success rate: 2xx answers within the timeout over requests sent.
- Retry amplification: requests the simulated upstreams received over requests clients sent.
- Traffic share: each upstream's part of the requests the upstreams received; over time, in a
  window of ``WINDOW_S`` centred on each moment.
- Time to divert: from a fault's start until the faulty upstream's share drops below half its
  fair share (its part of the total capacity); time to recover: from the fault's end until its
  share is back to ``RECOVERED`` of its fair share. None: not within the run.
- Cold-load rate: requests that paid a cold-load penalty over requests the upstreams served.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from webtorch_lab.model import Fault
from webtorch_lab.records import Records

WINDOW_S = 1.0
DIVERTED = 0.5  # below this fraction of its fair share, traffic was diverted
RECOVERED = 0.8  # back to this fraction of its fair share, it recovered
PERCENTILES = (50.0, 99.0, 99.9)


@dataclass(frozen=True)
class FaultTiming:
    upstream: str
    kind: str
    start: float
    end: float
    divert: float | None  # seconds after the start; None: never within the fault
    recover: float | None  # seconds after the end; None: not within the run, or not diverted


@dataclass
class RunMetrics:
    balancer: str
    requests: int
    percentiles: dict[float, float]  # percentile -> seconds (inf: a failure)
    success: float
    amplification: float
    shares: dict[str, float]  # upstream -> share of upstream requests
    faults: list[FaultTiming]
    cold_rate: float | None
    outcomes: dict[str, int]
    lag_p99: float
    lag_max: float
    upstream_requests: int
    latencies: list[float]  # sorted, failures as inf (for the percentile curve)
    times: list[float]  # centres of the share windows
    share_series: dict[str, list[float]]  # upstream -> share in the window at each time
    cpu: dict[str, float] = field(default_factory=dict)  # "balancer", "lab": CPU seconds / s


def percentile(ordered: Sequence[float], p: float) -> float:
    """The smallest value at or above ``p`` percent of ``ordered`` (nearest rank)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def arrivals_by_bucket(stats: Mapping[str, Any], buckets: int) -> list[int]:
    counts = [0] * buckets
    for index, n in stats["arrivals"].items():
        i = int(index)
        if 0 <= i < buckets:
            counts[i] += int(n)
    return counts


def share_series(
    stats: Mapping[str, Mapping[str, Any]], duration: float, window: float = WINDOW_S
) -> tuple[list[float], dict[str, list[float]]]:
    """Each upstream's share of the arrivals in a ``window`` centred on each bucket's centre."""
    names = list(stats)
    if not names:
        return [], {}
    bucket = float(next(iter(stats.values()))["bucket"])
    n = max(1, math.ceil(duration / bucket - 1e-9))
    counts = {name: arrivals_by_bucket(stats[name], n) for name in names}
    half = max(1, round(window / bucket / 2))
    prefix = {name: _prefix(c) for name, c in counts.items()}
    totals = _prefix([sum(c[i] for c in counts.values()) for i in range(n)])
    times: list[float] = []
    series: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half)
        total = totals[hi] - totals[lo]
        times.append((i + 0.5) * bucket)
        for name in names:
            part = prefix[name][hi] - prefix[name][lo]
            series[name].append(part / total if total else math.nan)
    return times, series


def _prefix(values: Sequence[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def fault_timing(
    upstream: str,
    fault: Fault,
    fair: float,
    times: Sequence[float],
    shares: Sequence[float],
) -> FaultTiming:
    divert: float | None = None
    for t, share in zip(times, shares, strict=True):
        if t < fault.start or t >= fault.end:
            continue
        if not math.isnan(share) and share < DIVERTED * fair:
            divert = t - fault.start
            break
    recover: float | None = None
    if divert is not None and math.isfinite(fault.end):
        for t, share in zip(times, shares, strict=True):
            if t >= fault.end and not math.isnan(share) and share >= RECOVERED * fair:
                recover = t - fault.end
                break
    return FaultTiming(upstream, fault.kind, fault.start, fault.end, divert, recover)


def analyse(
    balancer: str,
    records: Records,
    stats: Mapping[str, Mapping[str, Any]],
    *,
    duration: float,
    timeout: float,
    fair: Mapping[str, float],
    faults: Sequence[tuple[str, Fault]],
    cold: bool,
) -> RunMetrics:
    rows = records.rows
    n = len(rows)
    latencies = sorted(r.latency if r.ok and r.latency <= timeout else math.inf for r in rows)
    successes = sum(1 for latency in latencies if math.isfinite(latency))
    received = {name: int(s["requests"]) for name, s in stats.items()}
    upstream_total = sum(received.values())
    times, series = share_series(stats, duration)
    timings = [
        fault_timing(name, fault, fair.get(name, 0.0), times, series.get(name, []))
        for name, fault in faults
        if name in series
    ]
    cold_loads = sum(int(s["cold_loads"]) for s in stats.values())
    lags = sorted(r.lag for r in rows)
    return RunMetrics(
        balancer=balancer,
        requests=n,
        percentiles={p: percentile(latencies, p) for p in PERCENTILES},
        success=successes / n if n else math.nan,
        amplification=upstream_total / n if n else math.nan,
        shares={
            name: (count / upstream_total if upstream_total else 0.0)
            for name, count in received.items()
        },
        faults=timings,
        cold_rate=(cold_loads / upstream_total if upstream_total else 0.0) if cold else None,
        outcomes=dict(Counter(r.outcome for r in rows)),
        lag_p99=percentile(lags, 99.0) if lags else 0.0,
        lag_max=lags[-1] if lags else 0.0,
        upstream_requests=upstream_total,
        latencies=latencies,
        times=times,
        share_series=series,
    )


def group_shares(shares: Mapping[str, float], groups: Mapping[str, str]) -> dict[str, float]:
    """Shares summed by upstream group, in the order the groups first appear."""
    out: dict[str, float] = {}
    for name, share in shares.items():
        group = groups.get(name, name)
        out[group] = out.get(group, 0.0) + share
    return out
