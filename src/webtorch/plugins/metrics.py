"""The plugins' metrics for /metrics, read from their per-phase stats at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from webtorch.plugins.table import StatsStore


def metric_families(store: StatsStore) -> Iterator[Metric]:
    """Per plugin and phase: calls, failures (timeouts among them), seconds; nothing without
    plugins."""
    if not store:
        return
    calls = CounterMetricFamily(
        "webtorch_plugin_calls", "Calls of a plugin's phase", labels=["plugin", "phase"]
    )
    errors = CounterMetricFamily(
        "webtorch_plugin_errors",
        "A plugin's phase failed (raised, returned what it may not, or timed out)",
        labels=["plugin", "phase"],
    )
    timeouts = CounterMetricFamily(
        "webtorch_plugin_timeouts", "A plugin's async phase timed out", labels=["plugin", "phase"]
    )
    seconds = CounterMetricFamily(
        "webtorch_plugin_seconds",
        "Seconds in a plugin's phase (wall time: an async phase's includes its waiting)",
        labels=["plugin", "phase"],
    )
    for (plugin, phase), stats in sorted(store.items()):
        labels = [plugin, phase]
        calls.add_metric(labels, stats.calls)
        errors.add_metric(labels, stats.errors)
        timeouts.add_metric(labels, stats.timeouts)
        seconds.add_metric(labels, stats.seconds)
    yield calls
    yield errors
    yield timeouts
    yield seconds


def board(store: StatsStore) -> list[dict[str, object]]:
    """The dashboard's table: one row per plugin and phase, running totals (the page shows
    the time per call; several workers' rows are summed by workers/board.py)."""
    return [
        {
            "plugin": plugin,
            "phase": phase,
            "calls": stats.calls,
            "errors": stats.errors,
            "timeouts": stats.timeouts,
            "seconds": stats.seconds,
        }
        for (plugin, phase), stats in sorted(store.items())
    ]
