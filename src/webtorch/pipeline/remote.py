"""The remote placement: a stage whose batches run on other WebTorch servers.

``remote = "featurizers"`` in a stage's settings (``[pipelines.P.stages.S]``) names an
``[upstreams.featurizers]`` group whose servers serve that stage (``webtorch serve FILE --stages
S``). Each batch goes to ``POST /v2/pipelines/{P}/stages/{S}/infer`` in the stage wire form
(pipeline/wire.py: binary tensor data, records as BYTES elements) through the proxy's own
machinery: :class:`~webtorch.proxy.forward.Forward` on the group picks a server with the group's
policy, skips servers its health rules took out, retries a failed attempt on another server
within the group's retry rules and budget, and keeps the pooled keep-alive connections of
http/client.py; the group's connect, read and total timeouts bound every attempt. A stage batch
is a pure function of its rows, so a POST is retried like an idempotent request.

Errors keep their meaning across the hop:

- the group answers nothing usable (every server down, refused, reset, timed out): the batch
  fails with :class:`RemoteUnavailable`, an HTTP error (502, 503 or 504 as the proxy decided)
  whose message names the stage and the group; the runner answers every request of the batch
  with it, without narrowing down rows (that would send the batch again row by row into a down
  group);
- the stage server's own 500 (its function raised on a record): a plain exception, so the runner
  narrows the batch down request by request and row by row, as for a local stage, and the bad
  record's request answers 500 naming the stage and the record;
- a ``Reject`` row comes back as a row (the stage server keeps them) and answers 422 here.

What each boundary costs is measured per batch, both ends: serialize (the batch encoded here,
the answer encoded there), deserialize (the batch decoded there, the answer decoded here) and
transfer (the round trip less what the server says in Server-Timing it spent in its stages,
decoding and encoding: sockets, HTTP on both sides, the loops), as
``webtorch_pipeline_remote_seconds{pipeline,stage,part}``; the bytes each way are the stage's
``bytes_in`` / ``bytes_out``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from prometheus_client.core import HistogramMetricFamily, Metric

from webtorch.errors import ConfigError, HTTPError
from webtorch.http.messages import Request, Response
from webtorch.metrics import LATENCY_BUCKETS, Histogram, Metrics
from webtorch.pipeline.placement import Done, Placement, StageSite
from webtorch.pipeline.wire import decode_stage_batch, encode_stage_batch
from webtorch.proxy.forward import Forward
from webtorch.proxy.headers import TrustedProxies
from webtorch.proxy.upstream import ProxyRoute, UpstreamGroup
from webtorch.serve.wire.oip_binary import OCTET

if TYPE_CHECKING:
    from webtorch.proxy.upstream import Proxies

log: Final = logging.getLogger("webtorch.pipeline")

# A stage's answer is read whole before it is decoded; a bigger one fails the batch (502)
# rather than hold unbounded memory.
MAX_ANSWER: Final = 256 << 20
PARTS: Final = ("serialize", "transfer", "deserialize")
_ENTRY: Final = re.compile(rb"([\w.-]+);dur=([0-9.]+)")
# How a stage server's 500 begins (runner.py): the row it names is within its own batch.
_FAILED_ON: Final = re.compile(r"^stage '[^']*' failed(?: on record \d+)?: ")
# The stage servers see the front as the client of a batch (a batch joins several requests).
_CLIENT: Final = "127.0.0.1"


class RemoteUnavailable(HTTPError):
    """The stage's group gave no usable answer: 502, 503 or 504, naming the stage. The runner
    answers every request of the batch with it (an HTTPError from a placement is not the
    records' fault, so the batch is not narrowed down row by row into the same failure)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RemoteStageFailed(Exception):
    """The stage server answered 500 for the batch: its function failed on a row. The runner
    narrows the batch down as for a local stage, and the request's answer says what the server
    said failed (``ValueError('...')``), as a local stage's would."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause

    def __repr__(self) -> str:
        return self.cause  # what the runner's message quotes: the remote stage's own exception


class RemoteStats:
    """Seconds per batch spent on each part of a remote boundary."""

    def __init__(self) -> None:
        self.parts = {part: Histogram(LATENCY_BUCKETS) for part in PARTS}


class _Collect:
    """A streamed answer (larger than the proxy buffers), read whole into memory."""

    def __init__(self, batch: _Batch, response: Response) -> None:
        self.batch = batch
        self.response = response
        self.chunks: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> None:
        if self.size < 0:
            return
        self.size += len(data)
        if self.size > MAX_ANSWER:
            self.size = -1
            stream = self.response.stream
            if stream is not None:
                stream.cancel()
            self.batch.unavailable(502, f"answered more than {MAX_ANSWER} bytes")
            return
        self.chunks.append(data)

    def end(self) -> None:
        if self.size >= 0:
            self.batch.answered(self.response, b"".join(self.chunks))

    def abort(self) -> None:
        if self.size >= 0:
            self.batch.unavailable(502, "the answer broke off")


class _Batch:
    """One batch on its way to the group and back."""

    __slots__ = ("done", "encoded", "placement", "rows", "sent_at")

    def __init__(self, placement: RemotePlacement, rows: int, encoded: float, done: Done) -> None:
        self.placement = placement
        self.rows = rows
        self.encoded = encoded  # seconds the batch took to encode here
        self.done = done
        self.sent_at = time.perf_counter()

    def on_response(self, response: Response) -> None:
        stream = response.stream
        if stream is None:
            self.answered(response, response.body)
        else:
            stream.start(_Collect(self, response))

    def answered(self, response: Response, body: bytes) -> None:
        placement = self.placement
        received = time.perf_counter()
        status = response.status
        if status != 200:
            self.failed(status, body)
            return
        placement.stats.bytes_out += len(body)
        header_length = next(
            (v for k, v in response.headers if k == b"inference-header-content-length"), None
        )
        try:
            result, rows = decode_stage_batch(body, header_length, self.rows, "outputs")
        except HTTPError as exc:
            self.unavailable(502, f"answered a batch that does not decode: {exc.message}")
            return
        if rows != self.rows:
            self.unavailable(502, f"answered {rows} rows for {self.rows}")
            return
        decoded = time.perf_counter()
        stages, decode, encode = _server_timing(response.headers)
        parts = placement.remote.parts
        parts["serialize"].observe(self.encoded + encode)
        parts["transfer"].observe(max(0.0, received - self.sent_at - stages - decode - encode))
        parts["deserialize"].observe(decode + decoded - received)
        self.done(result, None)

    def failed(self, status: int, body: bytes) -> None:
        why = _error_text(body) or f"answered {status}"
        if status == 500:
            # The stage's own failure on some row: the runner narrows it down as for a local
            # stage (the server named the row within ITS batch, which is not the request's).
            self.done(None, RemoteStageFailed(_FAILED_ON.sub("", why, count=1)))
        elif status == 503 and why.startswith("no upstream of"):
            # The group has no server in rotation: as nginx's "no live upstreams", a 502.
            self.unavailable(502, why)
        elif status in (502, 503, 504):
            self.unavailable(status, why)
        else:
            # 4xx: the stage server refused the batch (another version of the pipeline file, a
            # token it wants): nothing a request can fix, the hop is broken.
            self.unavailable(502, f"refused the batch ({status}): {why}")

    def unavailable(self, status: int, why: str) -> None:
        placement = self.placement
        message = f"stage {placement.name!r} (upstream group {placement.group_name!r}): {why}"
        log.warning("pipeline %s: %s", placement.pipeline, message)
        self.done(None, RemoteUnavailable(status, message))


class RemotePlacement:
    """Batches of one stage sent to an upstream group (see the module's docstring)."""

    kind = "remote"

    def __init__(
        self,
        site: StageSite,
        groups: Callable[[], Mapping[str, UpstreamGroup]],
        trusted: Callable[[], TrustedProxies],
        remote: RemoteStats,
    ) -> None:
        assert site.settings.remote is not None
        self.pipeline = site.pipeline
        self.name = site.stage.name
        self.group_name = site.settings.remote
        self.stats = site.stats
        self.remote = remote
        # Batches in flight to the group at once: `workers` (the servers batch again on
        # their side; a few in flight keep every one of them busy).
        self.concurrency = site.settings.workers
        self._groups = groups
        self._trusted = trusted
        self._path = f"/v2/pipelines/{site.pipeline}/stages/{site.stage.name}/infer"
        self._headers: list[tuple[bytes, bytes]] = [(b"content-type", OCTET)]

    def run(self, batch: Any, done: Done) -> None:
        started = time.perf_counter()
        try:
            body, header_length = encode_stage_batch(batch)
        except Exception as exc:  # a row that has no wire form
            done(None, exc)
            return
        group = self._groups().get(self.group_name)
        if group is None or group.closed:
            message = f"stage {self.name!r}: no upstream group {self.group_name!r} (reloaded?)"
            done(None, RemoteUnavailable(503, message))
            return
        self.stats.bytes_in += len(body)
        request = Request(
            "POST",
            self._path,
            "",
            [
                *self._headers,
                (b"inference-header-content-length", b"%d" % header_length),
            ],
            body,
            client=_CLIENT,
            target=self._path.encode(),
        )
        rows = _rows(batch)
        state = _Batch(self, rows, time.perf_counter() - started, done)
        # Stage batches are pure functions of their rows: a POST may go to another server.
        route = ProxyRoute(group, self._trusted(), True)
        Forward(route, request).run().subscribe(_Batch.on_response, state)

    async def start(self) -> None:
        if self.group_name not in self._groups():
            raise ConfigError(f"stage {self.name!r}: no upstream group {self.group_name!r}")

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        group = self._groups().get(self.group_name)
        servers = [u.address for u in group.upstreams] if group is not None else []
        return {
            "placement": self.kind,
            "group": self.group_name,
            "servers": servers,
            "in_flight": self.concurrency,
        }


def _rows(batch: Any) -> int:
    if isinstance(batch, list):
        return len(batch)
    for column in batch.values():
        if isinstance(column, Mapping):  # a join: {"a": batch_a, ...}
            return _rows(column)
        return len(column)
    return 0


def _server_timing(headers: list[tuple[bytes, bytes]] | Any) -> tuple[float, float, float]:
    """What the stage server says it spent (Server-Timing), in seconds: in its stages, decoding
    the batch, encoding the answer (0 for what it does not say)."""
    stages = decode = encode = 0.0
    for name, value in headers:
        if name == b"server-timing":
            for entry, ms in _ENTRY.findall(value):
                seconds = float(ms) / 1000
                if entry == b"decode":
                    decode += seconds
                elif entry == b"encode":
                    encode += seconds
                else:
                    stages += seconds
    return stages, decode, encode


def _error_text(body: bytes) -> str:
    import orjson

    try:
        message = orjson.loads(body).get("error")
    except Exception:
        return body[:200].decode("utf-8", "replace").strip()
    return str(message) if message else ""


def factory(
    proxies: Callable[[], Proxies | None], metrics: Metrics
) -> Callable[[StageSite], Placement]:
    """The remote placement factory for ``Pipelines.install``: the app's upstream groups are
    looked up per batch (``proxies()``: the app makes them after the pipelines' routes, and a
    reload replaces them); each stage's boundary timings are exposed through ``metrics``. A
    stage's endpoint is open like a model's inference (no token)."""
    stats: dict[tuple[str, str], RemoteStats] = {}

    def groups() -> Mapping[str, UpstreamGroup]:
        current = proxies()
        return current.groups if current is not None else {}

    def trusted() -> TrustedProxies:
        current = proxies()
        return current.trusted if current is not None else TrustedProxies([])

    def make(site: StageSite) -> Placement:
        if not stats:  # the first remote stage: its metric family appears
            metrics.sources.append(families)
        remote = stats.setdefault((site.pipeline, site.stage.name), RemoteStats())
        return RemotePlacement(site, groups, trusted, remote)

    def families() -> Iterator[Metric]:
        seconds = HistogramMetricFamily(
            "webtorch_pipeline_remote_seconds",
            "Per batch sent to a remote stage: serialize (encoding it), transfer (the round trip "
            "less the stage's own time), deserialize (decoding the answer)",
            labels=["pipeline", "stage", "part"],
        )
        for (pipeline, stage), remote in sorted(stats.items()):
            for part, hist in remote.parts.items():
                seconds.add_metric([pipeline, stage, part], hist.buckets(), hist.total)
        yield seconds

    return make
