"""The dashboard's memory: one sample a second of what the server did in that second.

Metrics count from the start of the process; a dashboard wants rates and percentiles over the
last second, kept for the last few minutes. :class:`Timeline` turns the first into the second: each
:meth:`Timeline.sample` call diffs the counters against the previous call and keeps the result in a
bounded ring. It reads the in-process structures directly (no Prometheus text is parsed) and does
no I/O: the app calls it from its once-a-second tick, after the metrics are compacted, and the
dashboard's handler serves what it holds.

The samples are plain dicts in the shape of the stats JSON (see ``observe/dashboard.py`` and the
README's dashboard section), so serving them is one ``orjson.dumps``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric

from webtorch.metrics import Histogram, Metrics
from webtorch.proxy.upstream import Proxies, UpstreamGroup

if TYPE_CHECKING:
    from webtorch.guard.core import Guard  # torch: loaded only when the guard is on

HISTORY = 300  # samples kept: five minutes at one a second
QUANTILES = np.linspace(0, 100, 101)  # a second's latencies as another process merges them
Sample = dict[str, Any]


@dataclass(slots=True)
class _Counts:
    """Where the previous sample left each counter; a sample is the difference."""

    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    # Per (group, address): attempts, failures, latency count, latency total.
    servers: dict[tuple[str, str], tuple[int, int, int, float]] = field(default_factory=dict)
    # Per group: reasons' counts; the learned policy's (compared, predicted sum, observed sum).
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)
    predictions: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    # The guard's decisions by action.
    guard: dict[str, int] = field(default_factory=dict)
    # Per model: inference requests, batches, rows, train steps, train rows.
    models: dict[str, tuple[int, int, float, int, int]] = field(default_factory=dict)


class Timeline:
    """Samples the server once a second and keeps the last :data:`HISTORY` samples."""

    def __init__(
        self,
        metrics: Metrics,
        proxies: Callable[[], Proxies | None],
        connections: Callable[[], int],
        history: int = HISTORY,
        guard: Callable[[], Guard | None] = lambda: None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self._proxies = proxies
        self._connections = connections
        self._guard = guard
        self.samples: deque[Sample] = deque(maxlen=history)
        self.seq = 0
        self.started = clock()
        self._clock = clock
        self._monotonic = monotonic
        self._last: float | None = None
        self._counts = _Counts()
        self._watched: set[int] = set()  # ids of histograms whose raw values we take
        # Called with each sample (a worker of several publishes it: workers/board.py).
        self.listeners: list[Callable[[Sample], None]] = []
        # Set (to anything) by whoever merges this process's latencies with others': then each
        # sample also keeps the second's count and 101 percentiles here. None: not computed.
        self.quantiles: tuple[int, list[float]] | None = None

    def sample(self) -> Sample:
        """Diff everything against the previous call and append the result. The first call only
        sets the baseline (its rates cover however long the server ran before it), so it is
        recorded with the rates of a server that has not yet been watched: zero."""
        now = self._monotonic()
        elapsed = None if self._last is None else max(now - self._last, 1e-3)
        self._last = now
        previous, self._counts = self._counts, _Counts()
        sample: Sample = {
            "seq": self.seq + 1,
            "t": round(self._clock(), 3),
            "requests": self._requests(previous, elapsed),
            "connections": self._connections(),
            "upstreams": self._upstreams(previous, elapsed),
            "models": self._models(previous, elapsed),
            "guard": self._guard_sample(previous, elapsed),
        }
        self.seq += 1
        self.samples.append(sample)
        for listener in self.listeners:
            listener(sample)
        return sample

    @property
    def requests(self) -> int:
        """Requests answered up to the newest sample."""
        return self._counts.requests

    def since(self, seq: int) -> list[Sample]:
        """The samples newer than ``seq``, oldest first (all of them for a new reader)."""
        if seq >= self.seq:
            return []
        newer = self.seq - seq
        if newer >= len(self.samples):
            return list(self.samples)
        return list(self.samples)[-newer:]

    def metric_families(self) -> Iterator[Metric]:
        """Each upstream's share of its group's attempts over the newest sample's second."""
        share = GaugeMetricFamily(
            "webtorch_upstream_traffic_share",
            "Fraction of the group's attempts sent to this server in the last second",
            labels=["group", "upstream"],
        )
        if self.samples:
            for group, data in sorted(self.samples[-1]["upstreams"].items()):
                for address, server in data["servers"].items():
                    share.add_metric([group, address], server["share"])
        yield share

    # -- parts of a sample ----------------------------------------------------------------------

    def _requests(self, previous: _Counts, elapsed: float | None) -> dict[str, Any]:
        total = errors = client_errors = 0
        for (_route, _method, status), count in self.metrics.requests.items():
            total += count
            if status >= 500:
                errors += count
            elif status >= 400:
                client_errors += count
        counts = self._counts
        counts.requests, counts.errors, counts.client_errors = total, errors, client_errors
        values = self._take(self.metrics.latency.values())
        p50, p90, p99 = _percentiles(values) if elapsed is not None else (None, None, None)
        if self.quantiles is not None:
            self.quantiles = _quantiles(values) if elapsed is not None else (0, [])
        return {
            "rate": _rate(total - previous.requests, elapsed),
            "errors": _rate(errors - previous.errors, elapsed),
            "client_errors": _rate(client_errors - previous.client_errors, elapsed),
            "p50": p50,
            "p90": p90,
            "p99": p99,
        }

    def _take(self, histograms: Iterable[Histogram]) -> list[np.ndarray]:
        """The raw values these histograms compacted since the last sample. A histogram first
        seen now starts keeping them (routes appear as they are first requested)."""
        taken: list[np.ndarray] = []
        for hist in histograms:
            window = hist.window
            if window is None:
                hist.window = []
                continue
            taken.extend(window)
            window.clear()
        return taken

    def _upstreams(self, previous: _Counts, elapsed: float | None) -> dict[str, Any]:
        proxies = self._proxies()
        if proxies is None:
            return {}
        out: dict[str, Any] = {}
        now = self._monotonic()
        for name, group in sorted(proxies.groups.items()):
            out[name] = self._group(name, group, previous, elapsed, now)
        return out

    def _group(
        self,
        name: str,
        group: UpstreamGroup,
        previous: _Counts,
        elapsed: float | None,
        now: float,
    ) -> dict[str, Any]:
        counts = self._counts
        servers: dict[str, Any] = {}
        attempts_delta: dict[str, int] = {}
        for upstream, stats in zip(group.upstreams, group.stats, strict=True):
            key = (name, upstream.address)
            hist = stats.latency
            current = (stats.attempts, sum(stats.failures.values()), hist.count, hist.total)
            counts.servers[key] = current
            before = previous.servers.get(key, current if elapsed is None else (0, 0, 0, 0.0))
            attempts_delta[upstream.address] = current[0] - before[0]
            answered = current[2] - before[2]
            servers[upstream.address] = {
                "rate": _rate(current[0] - before[0], elapsed),
                "share": 0.0,
                "inflight": upstream.inflight,
                "latency": (current[3] - before[3]) / answered if answered > 0 else None,
                "errors": _rate(current[1] - before[1], elapsed),
                "state": group.health.state_of(upstream, now),
            }
        total = sum(attempts_delta.values())
        if total > 0:
            for address, delta in attempts_delta.items():
                servers[address]["share"] = delta / total
        reasons_now = dict(group.reasons)
        counts.reasons[name] = reasons_now
        reasons_before = previous.reasons.get(name, reasons_now if elapsed is None else {})
        reasons = {
            reason: _rate(count - reasons_before.get(reason, 0), elapsed)
            for reason, count in sorted(reasons_now.items())
            if count != reasons_before.get(reason, 0)
        }
        predicted = observed = None
        compared = getattr(group.policy, "compared", None)
        if isinstance(compared, tuple):
            counts.predictions[name] = compared
            n0, p0, o0 = previous.predictions.get(name, compared if elapsed is None else (0, 0, 0))
            n = compared[0] - n0
            if n > 0:
                predicted = (compared[1] - p0) / n
                observed = (compared[2] - o0) / n
        return {
            "servers": servers,
            "reasons": reasons,
            "predicted": predicted,
            "observed": observed,
        }

    def _guard_sample(self, previous: _Counts, elapsed: float | None) -> dict[str, float] | None:
        """Decisions per second by action (allow, throttle, block); None without a guard."""
        guard = self._guard()
        if guard is None:
            return None
        now: dict[str, int] = {"allow": 0, "throttle": 0, "block": 0}
        for (action, _reason), count in guard.stats.decisions.items():
            now[action] = now.get(action, 0) + count
        self._counts.guard = now
        before = previous.guard if elapsed is not None else now
        return {
            action: _rate(count - before.get(action, 0), elapsed) for action, count in now.items()
        }

    def _models(self, previous: _Counts, elapsed: float | None) -> dict[str, Any]:
        metrics = self.metrics
        out: dict[str, Any] = {}
        for name in sorted(set(metrics.models) | set(metrics.training)):
            model = metrics.models.get(name)
            training = metrics.training.get(name)
            current = (
                model.stages["queue"].count if model is not None else 0,
                model.batches if model is not None else 0,
                model.batch_rows.total if model is not None else 0.0,
                training.steps if training is not None else 0,
                training.examples if training is not None else 0,
            )
            self._counts.models[name] = current
            before = previous.models.get(name, current if elapsed is None else (0, 0, 0.0, 0, 0))
            batches = current[1] - before[1]
            rows = current[2] - before[2]
            loss = training.loss if training is not None else None
            out[name] = {
                "rate": _rate(current[0] - before[0], elapsed),
                "rows": _rate(rows, elapsed),
                "batch": rows / batches if batches > 0 else None,
                "train_steps": _rate(current[3] - before[3], elapsed),
                "train_rows": _rate(current[4] - before[4], elapsed),
                "loss": loss if loss is not None and math.isfinite(loss) else None,
            }
        return out


def _rate(delta: float, elapsed: float | None) -> float:
    if elapsed is None:
        return 0.0
    return round(delta / elapsed, 3)


def _quantiles(values: list[np.ndarray]) -> tuple[int, list[float]]:
    joined = np.concatenate(values) if values else np.empty(0)
    if joined.size == 0:
        return 0, []
    return int(joined.size), [float(v) for v in np.percentile(joined, QUANTILES)]


def _percentiles(values: list[np.ndarray]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    joined = np.concatenate(values)
    if joined.size == 0:
        return None, None, None
    p50, p90, p99 = np.percentile(joined, (50, 90, 99))
    return float(p50), float(p90), float(p99)
