"""Metrics: cheap in-process recording, Prometheus text exposition via prometheus-client.

prometheus-client's own Counter/Histogram take a lock and resolve label children on every call,
which costs more than a whole small inference here. So the hot path only bumps plain Python numbers
in the structures below (one event loop thread owns them), and a custom collector turns them into
Prometheus metric families when ``/metrics`` is scraped. Exposition stays prometheus-client's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final

import numpy as np
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from webtorch.http.messages import Request, Response

# Not Final: mypyc 2.4 leaves a Final tuple of constants unset where it is used (NameError).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
STAGES = ("decode", "queue", "preprocess", "network", "postprocess", "encode")


class Histogram:
    """A histogram whose hot-path cost is one C-level ``list.append``.

    :attr:`record` is the bound ``append`` of a pending list: callers on the request path keep it
    and call it with no Python frame in between. Pending values are folded into bucket counts in
    bulk with numpy by :meth:`compact`, which scrapes call and the server calls once a second, and
    :meth:`observe` calls when the list is long, so memory stays bounded either way.
    """

    __slots__ = ("_bounds", "_pending", "bounds", "counts", "record", "total", "window")

    COMPACT_AT: Final = 8192

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._bounds = np.asarray(self.bounds, dtype=np.float64)
        self.counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)  # last bucket: +Inf
        self.total = 0.0
        self._pending: list[float] = []
        self.record: Callable[[float], None] = self._pending.append
        # Raw values compacted since a reader last took them (the dashboard's percentiles over
        # one second); None, the default, keeps none.
        self.window: list[np.ndarray] | None = None

    def observe(self, value: float) -> None:
        self.record(value)
        self.bound()

    def bound(self) -> None:
        """Compact if enough observations are pending: what keeps ``record`` callers bounded."""
        if len(self._pending) >= self.COMPACT_AT:
            self.compact()

    def compact(self) -> None:
        pending = self._pending
        if not pending:
            return
        values = np.asarray(pending, dtype=np.float64)
        pending.clear()  # the same list: ``record`` stays bound to it
        # searchsorted "left" is bisect_left: a value equal to a bound lands in that bucket (le).
        slots = np.searchsorted(self._bounds, values, side="left")
        self.counts += np.bincount(slots, minlength=len(self.counts))
        self.total += float(values.sum())
        if self.window is not None:
            self.window.append(values)

    def buckets(self) -> list[tuple[str, float]]:
        self.compact()
        cumulative = np.cumsum(self.counts)
        out = [(repr(float(b)), float(c)) for b, c in zip(self.bounds, cumulative, strict=False)]
        out.append(("+Inf", float(cumulative[-1])))
        return out

    @property
    def count(self) -> int:
        self.compact()
        return int(self.counts.sum())


class ModelStats:
    """Per-model batching and stage timings, recorded by the executor and the model handlers."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.batch_rows = Histogram(BATCH_BUCKETS)
        self.batches = 0
        self.stages = {stage: Histogram(LATENCY_BUCKETS) for stage in STAGES}
        self.errors = 0
        # Recorded per request (by ``record``, which never compacts): bounded once per batch.
        self._per_request = [self.stages[s] for s in ("decode", "queue", "encode")]

    def bound(self) -> None:
        """Keep per-request observations bounded between the app's once-a-second compactions."""
        for hist in self._per_request:
            hist.bound()


class TrainStats:
    """What a model's trainer counts; recorded on the event loop thread."""

    def __init__(self) -> None:
        self.steps = 0
        self.examples = 0
        self.loss = float("nan")  # mean loss of the last step
        self.log_seconds = Histogram(LATENCY_BUCKETS)  # WAL append + fsync of a group
        self.step_seconds = Histogram(LATENCY_BUCKETS)  # forward, loss, backward, optimizer step
        self.step_rows = Histogram(BATCH_BUCKETS)
        self.checkpoint_step = 0
        self.checkpoint_time = time.time()
        self.replayed = 0


class StageStats:
    """One pipeline stage's instruments (``pipeline/runner.py`` records them on the loop)."""

    def __init__(self) -> None:
        self.latency = Histogram(LATENCY_BUCKETS)  # per request: queue wait + its batch's run
        self.wait = Histogram(LATENCY_BUCKETS)  # per request: queued until its batch started
        self.run = Histogram(LATENCY_BUCKETS)  # per batch: the stage's own time
        self.batch_rows = Histogram(BATCH_BUCKETS)
        self.rows = 0
        self.batches = 0
        self.errors = 0  # records rejected or failed in the stage
        # Bytes serialized across the stage's boundary: pickled to and from a process
        # placement's workers, sent to and received from a remote one; none cross in-process.
        self.bytes_in = 0
        self.bytes_out = 0

    def histograms(self) -> tuple[Histogram, ...]:
        return (self.latency, self.wait, self.run, self.batch_rows)


class Count:
    """One counter: a native int field, so counting allocates nothing (a dict of ints makes a
    new int object per increment)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class RouteCounts:
    """What is counted per route: requests by (method, status), latency, body bytes."""

    __slots__ = ("_last", "_last_method", "_last_status", "latency", "received", "sent", "statuses")

    def __init__(self) -> None:
        self.statuses: dict[tuple[str, int], Count] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.received = 0
        self.sent = 0
        # The counter last incremented: a route's requests mostly share one method and status,
        # and comparing two short strings costs less than building and hashing a tuple key.
        self._last = Count()
        self._last_method = ""
        self._last_status = -1

    def answered(self, method: str, status: int) -> None:
        if status == self._last_status and method == self._last_method:
            self._last.value += 1
            return
        key = (method, status)
        cell = self.statuses.get(key)
        if cell is None:
            cell = self.statuses[key] = Count()
        cell.value += 1
        self._last, self._last_method, self._last_status = cell, method, status


class Metrics:
    """Everything WebTorch counts, and the ``/metrics`` handler that exposes it."""

    def __init__(self) -> None:
        self.routes: dict[str, RouteCounts] = {}
        self.models: dict[str, ModelStats] = {}
        self.training: dict[str, TrainStats] = {}
        self.pipelines: dict[str, dict[str, StageStats]] = {}
        # Other parts' metric families, made at scrape time (the proxy's upstream groups).
        self.sources: list[Callable[[], Iterable[Metric]]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        # CPU seconds, resident memory, open file descriptors: prometheus-client reads /proc.
        ProcessCollector(registry=self.registry)

    def model(self, name: str) -> ModelStats:
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelStats()
        return stats

    def train(self, name: str) -> TrainStats:
        stats = self.training.get(name)
        if stats is None:
            stats = self.training[name] = TrainStats()
        return stats

    def stage(self, pipeline: str, stage: str) -> StageStats:
        stages = self.pipelines.setdefault(pipeline, {})
        stats = stages.get(stage)
        if stats is None:
            stats = stages[stage] = StageStats()
        return stats

    def _add_route(self, name: str) -> RouteCounts:
        """A route's first request: its counts start (callers looked it up already)."""
        counts = self.routes[name] = RouteCounts()
        return counts

    def observe_request(self, request: Request, status: int, seconds: float) -> None:
        """The HTTP protocol's observer: one call per answered request."""
        route = request.route or "unmatched"
        counts = self.routes.get(route)
        if counts is None:
            counts = self._add_route(route)
        counts.answered(request.method, status)
        counts.latency.record(seconds)
        size = request.body_length()
        if size:
            counts.received += size

    def observe_sent(self, request: Request, sent: int) -> None:
        """The protocol's byte observer: a response's body bytes, once they have gone out."""
        route = request.route or "unmatched"
        counts = self.routes.get(route)
        if counts is None:
            counts = self._add_route(route)
        counts.sent += sent

    @property
    def requests(self) -> dict[tuple[str, str, int], int]:
        """Requests answered by (route, method, status)."""
        return {
            (route, method, status): cell.value
            for route, counts in self.routes.items()
            for (method, status), cell in counts.statuses.items()
        }

    @property
    def latency(self) -> dict[str, Histogram]:
        return {route: counts.latency for route, counts in self.routes.items()}

    @property
    def received(self) -> dict[str, int]:
        """Request body bytes by route (a streamed upload: as declared)."""
        return {route: c.received for route, c in self.routes.items()}

    @property
    def sent(self) -> dict[str, int]:
        """Response body bytes sent, by route."""
        return {route: c.sent for route, c in self.routes.items()}

    def compact(self) -> None:
        """Fold pending observations into buckets; the app calls this once a second."""
        for counts in self.routes.values():
            counts.latency.compact()
        for training in self.training.values():
            training.log_seconds.compact()
            training.step_seconds.compact()
            training.step_rows.compact()
        for stats in self.models.values():
            stats.batch_rows.compact()
            for stage in stats.stages.values():
                stage.compact()
        for stages in self.pipelines.values():
            for stage_stats in stages.values():
                for hist in stage_stats.histograms():
                    hist.compact()

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
        received = CounterMetricFamily(
            "webtorch_http_request_body_bytes",
            "Request body bytes received (a streamed upload counts its declared length)",
            labels=["route"],
        )
        for route, count in sorted(m.received.items()):
            received.add_metric([route], count)
        yield received
        sent = CounterMetricFamily(
            "webtorch_http_response_body_bytes", "Response body bytes sent", labels=["route"]
        )
        for route, count in sorted(m.sent.items()):
            sent.add_metric([route], count)
        yield sent
        model_requests = CounterMetricFamily(
            "webtorch_model_requests",
            "Inference requests that reached a model's queue",
            labels=["model"],
        )
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
            model_requests.add_metric([name], stats.stages["queue"].count)
            batches.add_metric([name], stats.batches)
            errors.add_metric([name], stats.errors)
            for stage, hist in stats.stages.items():
                stages.add_metric([name, stage], hist.buckets(), hist.total)
        yield model_requests
        yield batch
        yield batches
        yield errors
        yield stages
        yield from _training(m.training)
        yield from _pipelines(m.pipelines)
        for source in m.sources:
            yield from source()


def connection_families(
    open_connections: int, accepted: int, reclaimed: int, refused: int, cap: int
) -> Iterator[Metric]:
    """The server's client connections, and what its connection cap did: a source the app adds
    once its server exists."""
    yield GaugeMetricFamily(
        "webtorch_http_connections", "Client connections open now", value=open_connections
    )
    yield CounterMetricFamily(
        "webtorch_http_connections_accepted", "Client connections accepted", value=accepted
    )
    yield GaugeMetricFamily(
        "webtorch_http_connections_max",
        "Client connections allowed at once (server.limits.max_connections, as ulimit -n allows)",
        value=cap,
    )
    yield CounterMetricFamily(
        "webtorch_http_connections_reclaimed",
        "Idle client connections closed at the connection cap to make room for new ones",
        value=reclaimed,
    )
    yield CounterMetricFamily(
        "webtorch_http_connections_refused",
        "Client connections refused with 503 at the connection cap (none idle to close)",
        value=refused,
    )


def _training(training: dict[str, TrainStats]) -> Iterator[Metric]:
    steps = CounterMetricFamily(
        "webtorch_train_steps", "Optimizer steps (micro-batches) taken", labels=["model"]
    )
    examples = CounterMetricFamily(
        "webtorch_train_examples", "Training rows applied", labels=["model"]
    )
    loss = GaugeMetricFamily("webtorch_train_loss", "Mean loss of the last step", labels=["model"])
    log_time = HistogramMetricFamily(
        "webtorch_train_wal_sync_seconds",
        "Time to append a group of micro-batches to the write-ahead log and fsync it",
        labels=["model"],
    )
    step_time = HistogramMetricFamily(
        "webtorch_train_step_seconds",
        "Time of a training step: forward, loss, backward and optimizer step",
        labels=["model"],
    )
    step_rows = HistogramMetricFamily(
        "webtorch_train_step_rows", "Rows per training step (micro-batch size)", labels=["model"]
    )
    age = GaugeMetricFamily(
        "webtorch_train_checkpoint_age_seconds",
        "Seconds since the newest checkpoint was written (or loaded)",
        labels=["model"],
    )
    now = time.time()
    for name, stats in sorted(training.items()):
        steps.add_metric([name], stats.steps)
        examples.add_metric([name], stats.examples)
        loss.add_metric([name], stats.loss)
        log_time.add_metric([name], stats.log_seconds.buckets(), stats.log_seconds.total)
        step_time.add_metric([name], stats.step_seconds.buckets(), stats.step_seconds.total)
        step_rows.add_metric([name], stats.step_rows.buckets(), stats.step_rows.total)
        age.add_metric([name], now - stats.checkpoint_time)
    yield from (steps, examples, loss, log_time, step_time, step_rows, age)


def _pipelines(pipelines: dict[str, dict[str, StageStats]]) -> Iterator[Metric]:
    labels = ["pipeline", "stage"]
    latency = HistogramMetricFamily(
        "webtorch_pipeline_stage_seconds",
        "Time a request's rows spent in a pipeline stage: queue wait and its batch's run",
        labels=labels,
    )
    wait = HistogramMetricFamily(
        "webtorch_pipeline_stage_queue_seconds",
        "Time a request's rows waited in a stage's queue before their batch started",
        labels=labels,
    )
    run = HistogramMetricFamily(
        "webtorch_pipeline_stage_batch_seconds", "Time a stage took per batch", labels=labels
    )
    batch = HistogramMetricFamily(
        "webtorch_pipeline_stage_batch_rows", "Rows per batch of a stage", labels=labels
    )
    rows = CounterMetricFamily(
        "webtorch_pipeline_stage_rows", "Rows through a stage", labels=labels
    )
    errors = CounterMetricFamily(
        "webtorch_pipeline_stage_errors", "Records a stage rejected or failed on", labels=labels
    )
    moved = CounterMetricFamily(
        "webtorch_pipeline_stage_bytes",
        "Bytes serialized across a stage's boundary (in: to it, out: from it): pickled for a "
        "process placement, on the wire for a remote one; none cross in-process",
        labels=[*labels, "direction"],
    )
    for pipeline, stages in sorted(pipelines.items()):
        for name, stats in stages.items():
            key = [pipeline, name]
            latency.add_metric(key, stats.latency.buckets(), stats.latency.total)
            wait.add_metric(key, stats.wait.buckets(), stats.wait.total)
            run.add_metric(key, stats.run.buckets(), stats.run.total)
            batch.add_metric(key, stats.batch_rows.buckets(), stats.batch_rows.total)
            rows.add_metric(key, stats.rows)
            errors.add_metric(key, stats.errors)
            moved.add_metric([*key, "in"], stats.bytes_in)
            moved.add_metric([*key, "out"], stats.bytes_out)
    yield from (latency, wait, run, batch, rows, errors, moved)
