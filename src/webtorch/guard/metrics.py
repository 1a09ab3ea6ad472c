"""The guard's metrics for /metrics (docs/METRICS.md), read from its stats at scrape time."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from webtorch.guard.core import Guard


def metric_families(guard: Guard) -> Iterator[Metric]:
    """The guard's metrics, for /metrics (see docs/METRICS.md)."""
    stats = guard.stats
    decisions = CounterMetricFamily(
        "webtorch_guard_decisions",
        "Requests and connections decided, by action and reason (in monitor mode: what the "
        "guard would have done)",
        labels=["action", "reason"],
    )
    for (action, reason), count in sorted(stats.decisions.items()):
        decisions.add_metric([action, reason], count)
    yield decisions
    scores = HistogramMetricFamily(
        "webtorch_guard_score", "The detector's score of each request it scored (higher head)"
    )
    scores.add_metric([], stats.scores.buckets(), stats.scores.total)
    yield scores
    yield GaugeMetricFamily(
        "webtorch_guard_bans", "Clients banned now", value=guard.ban_count(time.monotonic())
    )
    if guard.surge is not None:
        surge = guard.surge
        yield GaugeMetricFamily(
            "webtorch_guard_surge",
            "1 while a surge is under way (in any worker)",
            value=float(surge.active or guard.surge_began is not None),
        )
        yield CounterMetricFamily("webtorch_guard_surges", "Surges seen", value=surge.surges)
        yield GaugeMetricFamily(
            "webtorch_guard_surge_baseline_rate",
            "The server's request rate the surge detector takes as normal (requests/s)",
            value=surge.baseline,
        )
    yield GaugeMetricFamily(
        "webtorch_guard_clients", "Clients whose recent history is kept", value=len(guard.clients)
    )
    yield CounterMetricFamily(
        "webtorch_guard_clients_evicted",
        "Client histories forgotten to stay within max_clients",
        value=guard.clients.evicted,
    )
