"""Load probes, both sides: the proxy's prober and the server's ``GET /v2/health/load``.

The wire format is one small JSON object, ``{"inflight": N, "latency": seconds}``: the requests
the server is working on now and its recent median service time (0.0 when it has served none).

:class:`Prober` is the proxy's side: a policy with ``probing`` set (Prequal) names upstreams to
probe after each pick, the group hands them to :meth:`Prober.send`, which starts the probes and
returns at once; each result goes to ``policy.on_probe`` on the event loop. Probes never queue
up: at most one is in flight per upstream (a probe asked for meanwhile is skipped, the policy
simply sees one result fewer), and at most ``max_inflight`` in all. Each upstream gets one
kept-alive connection of the prober's own, apart from the request pools, so a probe never
waits behind requests and a request never behind a probe. Probes are GETs through the upstream
client (``http/client.py``'s :func:`fetch`), so its parser and head limits bound what an
upstream can make the prober hold, as they bound proxied responses.

:class:`LoadReport` is the server's side, computed on demand so that the request path pays
nothing for it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from webtorch.balance.base import Policy, ProbeResult, Upstream
from webtorch.errors import MethodNotAllowed
from webtorch.http.client.fetch import fetch
from webtorch.http.client.pool import ConnectionPool
from webtorch.http.client.settings import PoolSettings
from webtorch.http.messages import Request, Response, json_response
from webtorch.metrics import LATENCY_BUCKETS, Metrics

if TYPE_CHECKING:
    from webtorch.http.server import HttpServer

log = logging.getLogger("webtorch.proxy")

LOAD_PATH = "/v2/health/load"
_MAX_HEAD = 16 * 1024  # a probe answer is tiny; anything bigger is not a load report
_MAX_HEADERS = 50
_MAX_BODY = 16 * 1024
_HEADERS = b"user-agent: webtorch-probe\r\naccept: application/json\r\n"


class Prober:
    """Sends load probes for one upstream group's policy (see the module doc)."""

    def __init__(
        self,
        policy: Policy,
        path: str,
        timeout: float,
        loop: asyncio.AbstractEventLoop,
        *,
        max_inflight: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.path = path
        self.timeout = timeout
        self.loop = loop
        self.max_inflight = max_inflight
        self.clock = clock
        self.closed = False
        self.sent = 0  # probes started
        self.skipped = 0  # probes not started: one to the same upstream was in flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy: set[Upstream] = set()  # upstreams with a probe in flight
        # A pool per upstream keeping one idle kept-alive connection between its probes, with
        # the upstream client's parser and limits (a probe answer is tiny: tighter ones).
        self._pools: dict[Upstream, ConnectionPool] = {}
        self._settings = PoolSettings(
            keepalive=1,
            max_requests_per_connection=0,
            connect_timeout=timeout,
            read_timeout=timeout,
            max_response_header_bytes=_MAX_HEAD,
            max_response_headers=_MAX_HEADERS,
        )

    @property
    def inflight(self) -> int:
        return len(self._busy)

    def send(self, upstreams: Iterable[Upstream]) -> None:
        """Start a probe to each of ``upstreams`` that has none in flight; never waits."""
        if self.closed:
            return
        for upstream in upstreams:
            if upstream in self._busy or len(self._busy) >= self.max_inflight:
                self.skipped += 1
                continue
            self._busy.add(upstream)
            self.sent += 1
            task = self.loop.create_task(self._probe(upstream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _probe(self, upstream: Upstream) -> None:
        result: ProbeResult | None = None
        try:
            status, body = await fetch(
                self._pool(upstream),
                self.path,
                _HEADERS,
                within=self.timeout,
                max_body=_MAX_BODY,
            )
            result = parse_load(body) if status == 200 else None
        except Exception:  # refused, reset, timed out, not HTTP, too large: no report
            result = None
        finally:
            self._busy.discard(upstream)
        if self.closed:
            return
        try:
            self.policy.on_probe(upstream, result, self.clock())
        except Exception:  # a policy bug must not kill the prober (nor leak a task error)
            log.exception("policy %s failed in on_probe()", self.policy.name)

    def _pool(self, upstream: Upstream) -> ConnectionPool:
        pool = self._pools.get(upstream)
        if pool is None:
            pool = self._pools[upstream] = ConnectionPool(upstream, self._settings, self.loop)
        return pool

    def close(self) -> None:
        """Cancel the probes in flight and close the connections."""
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        for pool in self._pools.values():
            pool.abort()
        self._pools.clear()


def parse_load(body: bytes) -> ProbeResult | None:
    """``{"inflight": int >= 0, "latency": finite float >= 0}`` as a ProbeResult; None for
    anything else (extra keys are allowed, for later extensions)."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    inflight = data.get("inflight")
    latency = data.get("latency", 0.0)
    if isinstance(inflight, bool) or not isinstance(inflight, int) or inflight < 0:
        return None
    if isinstance(latency, bool) or not isinstance(latency, int | float):
        return None
    latency = float(latency)
    if not math.isfinite(latency) or latency < 0.0:
        return None
    return ProbeResult(inflight, latency)


# -- the server's side ------------------------------------------------------------------------

# Routes whose requests are control traffic, not service: their times would drag the median
# toward zero (probes, health checks and scrapes are frequent and cheap).
_CONTROL = frozenset({"unmatched", "/metrics", "/admin/reload", "/v2", "/models"})
_CONTROL_PREFIXES = ("/v2/health", "/v2/repository")
_MODEL_PREFIXES = ("/v2/models/", "/models/")
_MODEL_WORK = ("/infer", "/predict", "/train")


def is_service_route(name: str) -> bool:
    """Whether requests of the route labelled ``name`` count toward the reported latency:
    inference, training and the config's own routes; not metadata, health or management."""
    if name.startswith(_MODEL_PREFIXES):
        return name.endswith(_MODEL_WORK)
    return name not in _CONTROL and not name.startswith(_CONTROL_PREFIXES)


class LoadReport:
    """The handler of ``GET /v2/health/load``.

    ``inflight``: requests the server has read and not yet answered, counted across its
    connections at the time of the probe (the probe itself not included): walking the
    connections costs the probe, not every request.

    ``latency``: the median service time of the requests answered in the last ``window`` to
    ``2 x window`` seconds, interpolated within the buckets of the request-latency histograms
    the metrics already keep (so bucket-resolution; good enough to rank servers), from the
    service routes only (see :func:`is_service_route`). Recomputed at most every ``refresh``
    seconds, so probes at a high rate cost little.
    """

    def __init__(
        self,
        server: Callable[[], HttpServer | None],
        metrics: Metrics,
        *,
        window: float = 5.0,
        refresh: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.metrics = metrics
        self.window = window
        self.refresh = refresh
        self.clock = clock
        self._bounds = np.asarray(LATENCY_BUCKETS, dtype=np.float64)
        self._service: dict[str, bool] = {}
        self._newer: tuple[float, np.ndarray[Any, Any]] | None = None
        self._older: np.ndarray[Any, Any] | None = None
        self._latency = 0.0
        self._computed_at = -math.inf

    def __call__(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"use GET {LOAD_PATH}", ("GET", "HEAD"))
        return json_response({"inflight": self.inflight(request), "latency": self.latency()})

    def inflight(self, exclude: Request | None = None) -> int:
        server = self.server()
        if server is None:
            return 0
        count = 0
        for conn in server.state.connections:
            slots = conn.slots
            if not slots:
                continue
            for slot in slots:
                if slot.response is None and slot.request is not None:
                    count += 1
                    if slot.request is exclude:
                        count -= 1
        return count

    def latency(self) -> float:
        now = self.clock()
        if now - self._computed_at < self.refresh:
            return self._latency
        self._computed_at = now
        current = self._counts()
        newer = self._newer
        if newer is None or now - newer[0] >= self.window:
            self._older = newer[1] if newer is not None else None
            self._newer = (now, current)
        recent = current if self._older is None else np.maximum(current - self._older, 0)
        self._latency = median_of_buckets(self._bounds, recent)
        return self._latency

    def _counts(self) -> np.ndarray[Any, Any]:
        total = np.zeros(len(LATENCY_BUCKETS) + 1, dtype=np.int64)
        service = self._service
        for name, hist in self.metrics.latency.items():
            counts = service.get(name)
            if counts is None:
                counts = service[name] = is_service_route(name)
            if counts and hist.bounds == LATENCY_BUCKETS:
                hist.compact()
                total += hist.counts
        return total


def median_of_buckets(bounds: np.ndarray[Any, Any], counts: np.ndarray[Any, Any]) -> float:
    """The median of a histogram (``counts[i]`` values up to ``bounds[i]``, the last one above
    every bound), by linear interpolation within its bucket, as Prometheus'
    ``histogram_quantile``; 0.0 for an empty one."""
    total = int(counts.sum())
    if total <= 0:
        return 0.0
    rank = total / 2.0
    cumulative = np.cumsum(counts)
    i = int(np.searchsorted(cumulative, rank, side="left"))
    if i >= len(bounds):
        return float(bounds[-1])  # in the open-ended bucket: its lower edge is all we know
    lower = float(bounds[i - 1]) if i > 0 else 0.0
    upper = float(bounds[i])
    before = float(cumulative[i - 1]) if i > 0 else 0.0
    inside = float(counts[i])
    fraction = (rank - before) / inside if inside > 0 else 1.0
    return lower + (upper - lower) * fraction
