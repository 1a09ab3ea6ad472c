"""Metrics: cheap in-process recording, Prometheus text exposition via prometheus-client.

prometheus-client's own Counter/Histogram take a lock and resolve label children on every call,
which costs more than a whole small inference here. So the hot path only bumps plain Python numbers
in the structures below (one event loop thread owns them), and a custom collector turns them into
Prometheus metric families when ``/metrics`` is scraped. Exposition stays prometheus-client's.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from webtorch.http.messages import Request, Response

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
STAGES = ("decode", "queue", "preprocess", "network", "postprocess", "encode")


class Histogram:
    """Cumulative-at-scrape histogram: one bisect and two additions per observation."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last bucket: +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


class ModelStats:
    """Per-model batching and stage timings, recorded by the executor and the model handlers."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.batch_rows = Histogram(BATCH_BUCKETS)
        self.batches = 0
        self.stages = {stage: Histogram(LATENCY_BUCKETS) for stage in STAGES}
        self.errors = 0


class Metrics:
    """Everything WebTorch counts, and the ``/metrics`` handler that exposes it."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.models: dict[str, ModelStats] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def model(self, name: str) -> ModelStats:
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelStats()
        return stats

    def observe_request(self, request: Request, status: int, seconds: float) -> None:
        """The HTTP protocol's observer: one call per answered request."""
        route = request.route or "unmatched"
        key = (route, request.method, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def handle(self, request: Request) -> Response:
        return Response(200, self.exposition(), CONTENT_TYPE_LATEST.encode())


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        requests = CounterMetricFamily(
            "webtorch_http_requests", "HTTP requests answered", labels=["route", "method", "status"]
        )
        for (route, method, status), count in sorted(m.requests.items()):
            requests.add_metric([route, method, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            "webtorch_http_request_duration_seconds",
            "Time from a request's last byte to its response being ready",
            labels=["route"],
        )
        for route, hist in sorted(m.latency.items()):
            latency.add_metric([route], hist.buckets(), hist.total)
        yield latency
        batch = HistogramMetricFamily(
            "webtorch_model_batch_rows", "Rows per forward pass", labels=["model"]
        )
        batches = CounterMetricFamily(
            "webtorch_model_batches", "Forward passes run", labels=["model"]
        )
        errors = CounterMetricFamily(
            "webtorch_model_errors", "Requests failed inside the model", labels=["model"]
        )
        stages = HistogramMetricFamily(
            "webtorch_model_stage_seconds",
            "Time per pipeline stage: decode, queue and encode per request; "
            "preprocess, network and postprocess per batch",
            labels=["model", "stage"],
        )
        for name, stats in sorted(m.models.items()):
            batch.add_metric([name], stats.batch_rows.buckets(), stats.batch_rows.total)
            batches.add_metric([name], stats.batches)
            errors.add_metric([name], stats.errors)
            for stage, hist in stats.stages.items():
                stages.add_metric([name, stage], hist.buckets(), hist.total)
        yield batch
        yield batches
        yield errors
        yield stages
