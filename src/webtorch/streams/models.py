"""Model streams: ``GET /v2/models/{name}/stream`` (a WebSocket) for a model that declares
``stream=webtorch.Streaming(...)`` (serve/model.py).

Each message is one item: ``{"id": 7, "<item input>": [...]}`` (the id is the client's, echoed;
default: the item's number in the stream). Each stream keeps its state in the store
(streams/store.py); an item is queued on the model's executor with that state (a recurrent
model's) or the stream's window of recent items, so that the items of many streams ride one
forward pass: the executor's batcher gathers the rows (states included), runs the batch, and
scatters the outputs, from which each stream takes its new state, as Triton's sequence batcher
does. One item per stream is in flight at a time (the next needs its state), so each stream is
answered in order; the others wait in the stream's queue, and past ``streams.max_pending`` the
connection stops reading. The first message the server sends names the stream:
``{"stream": "<id>"}``; a client that reconnects with ``?stream=<id>`` within ``streams.expiry``
resumes its state.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import orjson
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from webtorch.errors import BadRequest, HTTPError, NotFound, ServiceUnavailable
from webtorch.http.messages import Request, Response
from webtorch.metrics import LATENCY_BUCKETS, Histogram
from webtorch.streams.hub import Hub
from webtorch.streams.store import MAX_ID, Full, InUse, StreamState, StreamStore
from webtorch.streams.upgrade import WebSocketRoute, accept, handshake
from webtorch.streams.websocket import TRY_LATER, WebSocket

if TYPE_CHECKING:  # both bring torch: a server that only proxies WebSockets never loads it
    from webtorch.serve.executor import Executor
    from webtorch.serve.model import Streaming
    from webtorch.serve.wire.tensors import InputData

_clock: Final = time.perf_counter
_PATH: Final = re.compile(r"/v2/models/([A-Za-z0-9_.\-]+)/stream")
_SANE_ID: Final = re.compile(rf"[A-Za-z0-9_.:\-]{{1,{MAX_ID}}}")
_DONE: Final = Response(200, b"")  # what a stream's jobs answer: their outputs are stashed


class Conflict(HTTPError):
    status = 409


class StreamStats:
    """What /metrics shows of the model streams."""

    def __init__(self) -> None:
        self.items = 0  # answered
        self.errors = 0  # items answered with an error
        self.latency = Histogram(LATENCY_BUCKETS)  # per item: arrival to answer sent


class ModelStreams:
    """The stream route of every model that streams (a WebSocketRoute), and their store."""

    def __init__(
        self, hub: Hub, store: StreamStore, executors: Callable[[str], Executor | None]
    ) -> None:
        self.hub = hub
        self.store = store
        self.executors = executors
        self.stats = StreamStats()

    def find(self, request: Request) -> WebSocketRoute | None:
        return self if _PATH.fullmatch(request.path) else None

    def take(
        self,
        request: Request,
        transport: asyncio.Transport,
        rest: bytes,
        release: Callable[[], None],
    ) -> Response | bool:
        match = _PATH.fullmatch(request.path)
        assert match is not None
        name = match.group(1)
        executor = self.executors(name)
        if executor is None:
            raise NotFound(f"no model named {name!r}")
        spec = executor.model.spec.stream
        if spec is None:
            raise NotFound(f"model {name!r} does not serve streams (it declares no `stream`)")
        stream_id = _query(request.query, "stream")
        if stream_id is None:
            stream_id = uuid.uuid4().hex
        elif not _SANE_ID.fullmatch(stream_id):
            raise BadRequest(f"a stream id is 1-{MAX_ID} of A-Z a-z 0-9 _ . : -")
        shake = handshake(request)
        now = self.hub.clock()
        try:
            state = self.store.attach(_fresh(executor, spec, (name, stream_id)), now)
        except Full as exc:
            raise ServiceUnavailable(str(exc)) from None
        except InUse as exc:
            raise Conflict(str(exc)) from None
        request.model = name
        session = Session(self, executor, spec, state)
        try:
            ws = accept(self.hub, shake, session, transport, rest, release)
        except BaseException:
            self.store.detach(state, now)
            raise
        session.ws = ws
        ws.send(orjson.dumps({"stream": stream_id, "resumed": state.count > 0}).decode())
        session.flush_hello()
        return True

    def metric_families(self) -> Iterator[Metric]:
        store, stats = self.store, self.stats
        yield GaugeMetricFamily(
            "webtorch_streams_open", "Model streams open on a connection now", value=store.attached
        )
        yield GaugeMetricFamily(
            "webtorch_streams_stored",
            "Model streams whose state is kept (open, or closed and not yet expired)",
            value=len(store.streams),
        )
        yield GaugeMetricFamily(
            "webtorch_streams_state_bytes", "Bytes of per-stream state kept", value=store.bytes
        )
        yield CounterMetricFamily(
            "webtorch_streams_expired", "Streams dropped after streams.expiry", value=store.expired
        )
        yield CounterMetricFamily(
            "webtorch_streams_refused",
            "New streams refused at streams.max_streams or max_state_bytes",
            value=store.refused,
        )
        yield CounterMetricFamily(
            "webtorch_streams_items", "Stream items answered", value=stats.items
        )
        yield CounterMetricFamily(
            "webtorch_streams_item_errors",
            "Stream items answered with an error",
            value=stats.errors,
        )
        hist = HistogramMetricFamily(
            "webtorch_streams_item_seconds", "Per item: from its message in to its answer out"
        )
        hist.add_metric([], stats.latency.buckets(), stats.latency.total)
        yield hist


def _query(query: str, key: str) -> str | None:
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == key:
            return value
    return None


def _fresh(executor: Executor, spec: Streaming, key: tuple[str, str]) -> StreamState:
    """A new stream's state: zeros of the state input's row, or an empty window."""
    inputs = {t.name: t for t in executor.model.inputs}
    state = window = None
    if spec.state is not None:
        tensor = inputs[spec.state[0]]
        if any(d < 0 for d in tensor.shape[1:]):
            raise BadRequest(f"state input {tensor.name!r} needs a fixed shape to be kept")
        state = np.zeros(tensor.shape[1:], dtype=tensor.dtype.numpy)
    if spec.window:
        tensor = inputs[spec.item]
        if any(d < 0 for d in tensor.shape[1:]):
            raise BadRequest(f"input {tensor.name!r} needs a fixed item shape for a window")
        window = np.zeros(tensor.shape[1:], dtype=tensor.dtype.numpy)
    return StreamState(key, state, window)


class Session:
    """One open stream: its connection, its queue of items, the one in flight."""

    def __init__(
        self, owner: ModelStreams, executor: Executor, spec: Streaming, state: StreamState
    ) -> None:
        self.owner = owner
        self.executor = executor
        self.spec = spec
        self.state = state
        self.ws: WebSocket | None = None
        item = next(t for t in executor.model.inputs if t.name == spec.item)
        self.item_shape = item.shape[2:] if spec.window else item.shape[1:]
        self.item_dtype = item.dtype.numpy
        self.outputs = [t.name for t in executor.model.outputs]
        if spec.state is not None:
            self.outputs.remove(spec.state[1])
        self.queue: deque[tuple[Any, np.ndarray, float]] = deque()
        self.in_flight: tuple[Any, float] | None = None
        self._stash: Mapping[str, np.ndarray] | None = None
        self.ended = False
        self.max_pending = owner.hub.settings.max_pending
        self._hello_sent = False
        self.received = state.count  # items of the stream received (a resumed one's included)

    def flush_hello(self) -> None:
        """The stream's name went out: items that came with the handshake may be run now."""
        self._hello_sent = True
        self._next()

    # -- Handler ------------------------------------------------------------------------------

    def message(self, ws: WebSocket, data: str | bytes) -> None:
        number = self.received  # the item's number in the stream: its default id
        self.received += 1
        try:
            item_id, item = self._decode(data, number)
        except HTTPError as exc:
            self.owner.stats.errors += 1
            ws.send(orjson.dumps({"error": exc.message}).decode())
            return
        self.queue.append((item_id, item, _clock()))
        if len(self.queue) + 1 >= self.max_pending:
            ws.hold(True)
        if self._hello_sent:
            self._next()

    def closed(self, ws: WebSocket, code: int) -> None:
        self.ended = True
        self.queue.clear()
        if self.in_flight is None:
            self.owner.store.detach(self.state, self.owner.hub.clock())
        # else: detached when its answer comes, its state updated first (a resume sees it)

    # -- inside -------------------------------------------------------------------------------

    def _decode(self, data: str | bytes, number: int) -> tuple[Any, np.ndarray]:
        if isinstance(data, bytes):
            raise BadRequest("send items as JSON text messages")
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"an item is a JSON object: {exc}") from None
        if not isinstance(doc, dict):
            raise BadRequest("an item is a JSON object")
        item_id = doc.get("id", number)
        if not isinstance(item_id, int | str) or (isinstance(item_id, str) and len(item_id) > 64):
            raise BadRequest("`id` is an integer or a string of at most 64 characters")
        name = self.spec.item
        if name not in doc:
            raise BadRequest(f"item {item_id!r}: no {name!r}")
        try:
            array = np.asarray(doc[name], dtype=self.item_dtype)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"item {item_id!r}: {name!r} is not numbers: {exc}") from None
        if array.shape != tuple(self.item_shape):
            raise BadRequest(
                f"item {item_id!r}: {name!r} has shape {list(array.shape)}, "
                f"expected {list(self.item_shape)}"
            )
        return item_id, array

    def _next(self) -> None:
        """Run the next queued item, if none is in flight (its state is the last one's)."""
        while self.in_flight is None and self.queue and not self.ended:
            item_id, item, arrived = self.queue.popleft()
            state, spec = self.state, self.spec
            if spec.window:
                state.push(item)
                seen = state.count
                k = spec.window
                if seen < k or (seen - k) % spec.every:
                    continue  # no answer for this item: its window is not due
                inputs: dict[str, InputData] = {spec.item: state.recent()[None]}
            else:
                state.count += 1
                inputs = {spec.item: item[None]}
                if spec.state is not None:
                    assert state.state is not None
                    inputs[spec.state[0]] = state.state[None]
            try:
                pending = self.executor.submit(inputs, 1, self._encode)
            except HTTPError as exc:
                self._answer_error(item_id, exc.message)
                continue
            self.in_flight = (item_id, arrived)
            pending.subscribe(self._done, None)
        ws = self.ws
        if ws is not None and ws.held and len(self.queue) + 1 < self.max_pending:
            ws.hold(False)

    def _encode(self, outputs: dict[str, np.ndarray]) -> Response:
        self._stash = outputs
        return _DONE

    def _done(self, _arg: None, response: Response) -> None:
        in_flight, self.in_flight = self.in_flight, None
        assert in_flight is not None
        item_id, arrived = in_flight
        outputs, self._stash = self._stash, None
        if response is not _DONE or outputs is None:
            try:
                message = orjson.loads(response.body).get("error", "model failed")
            except (orjson.JSONDecodeError, AttributeError):
                message = "model failed"
            self._answer_error(item_id, str(message))
        else:
            spec = self.spec
            if spec.state is not None:
                assert self.state.state is not None
                self.state.state[...] = outputs[spec.state[1]][0]
            answer = {"id": item_id, "outputs": {n: outputs[n][0].tolist() for n in self.outputs}}
            self._send(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY))
            stats = self.owner.stats
            stats.items += 1
            stats.latency.observe(_clock() - arrived)
        if self.ended:
            self.owner.store.detach(self.state, self.owner.hub.clock())
            return
        self._next()

    def _answer_error(self, item_id: Any, message: str) -> None:
        self.owner.stats.errors += 1
        self._send(orjson.dumps({"id": item_id, "error": message}))
        if self.ws is not None and "queue is full" in message:
            self.ws.close(TRY_LATER, "model queue is full")

    def _send(self, data: bytes) -> None:
        ws = self.ws
        if ws is not None and not self.ended:
            ws.send(data.decode())
