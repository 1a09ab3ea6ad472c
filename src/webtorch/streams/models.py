"""Model streams: ``GET /v2/models/{name}/stream`` (a WebSocket) for a model that declares
``stream=webtorch.Streaming(...)`` (serve/model.py).

Each message is one item: ``{"id": 7, "<item input>": [...]}`` (the id is the client's, echoed;
default: the item's number in the stream), a JSON array of such items, or a binary message of
raw little-endian rows (items numbered in arrival order). Each stream keeps its state in the store
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
import math
import re
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
import orjson
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from webtorch.errors import (
    BadRequest,
    HTTPError,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
)
from webtorch.http.messages import HandlerResult, Request, Response, json_response
from webtorch.http.router import Route
from webtorch.metrics import LATENCY_BUCKETS, Histogram
from webtorch.streams.hub import Hub
from webtorch.streams.ndjson import check_ndjson, open_stream
from webtorch.streams.store import MAX_ID, Full, InUse, StreamState, StreamStore
from webtorch.streams.upgrade import WebSocketRoute, accept, handshake
from webtorch.streams.watch import EVENT_STREAM, MAX_WATCHERS, Watcher
from webtorch.streams.websocket import TRY_LATER

if TYPE_CHECKING:  # these bring torch: a server that only proxies WebSockets never loads it
    from webtorch.serve.executor import Executor
    from webtorch.serve.model import Streaming
    from webtorch.serve.oip import Auth
    from webtorch.serve.wire.tensors import InputData
    from webtorch.train.forms import TrainRequest

_clock: Final = time.perf_counter
_PATH: Final = re.compile(r"/v2/models/([A-Za-z0-9_.\-]+)/stream")
_SANE_ID: Final = re.compile(rf"[A-Za-z0-9_.:\-]{{1,{MAX_ID}}}")
_DONE: Final = Response(200, b"")  # what a stream's jobs answer: their outputs are stashed


class Conflict(HTTPError):
    status = 409


class Channel(Protocol):
    """Where a stream's answers go and whose reading its queue holds: a WebSocket, or the
    NDJSON form's request and response bodies (streams/ndjson.py)."""

    held: bool

    def send(self, data: str) -> None: ...

    def hold(self, held: bool) -> None: ...

    def close(self, code: int = 1000, reason: str = "") -> None: ...


class StreamStats:
    """What /metrics shows of the model streams."""

    def __init__(self) -> None:
        self.items = 0  # answered
        self.errors = 0  # items answered with an error
        self.latency = Histogram(LATENCY_BUCKETS)  # per item: arrival to answer sent
        self.labels = 0  # labelled items handed to the trainer
        self.trained = 0  # of which the trainer applied (answered with its step)


class ModelStreams:
    """The stream route of every model that streams (a WebSocketRoute), and their store."""

    def __init__(
        self,
        hub: Hub,
        store: StreamStore,
        executors: Callable[[str], Executor | None],
        auth: Auth | None = None,
    ) -> None:
        self.hub = hub
        self.store = store
        self.executors = executors
        self.auth = auth  # who may send labels (train): the token and the sender's origin
        self.stats = StreamStats()
        self.sessions: dict[tuple[str, str], Session] = {}  # open streams, for their watchers
        self._route = Route(
            "/v2/models/{name}/stream", self.ndjson, "/v2/models/stream", stream=True
        )

    def find(self, request: Request) -> WebSocketRoute | None:
        return self if _PATH.fullmatch(request.path) else None

    def route(self, path: str) -> Route | None:
        """The HTTP form's route for ``path`` (a streamed route: dispatched at its headers)."""
        if not path.endswith("/stream") or not _PATH.fullmatch(path):
            return None
        return self._route

    def take(
        self,
        request: Request,
        transport: asyncio.Transport,
        rest: bytes,
        release: Callable[[], None],
    ) -> Response | bool:
        executor, spec, stream_id = self._prepare(request)
        shake = handshake(request)
        session = self._attach(request, executor, spec, stream_id)
        try:
            ws = accept(self.hub, shake, session, transport, rest, release)
        except BaseException:
            session.closed(None, 1011)
            raise
        session.ws = ws
        ws.send(session.hello())
        session.flush_hello()
        return True

    def ndjson(self, request: Request) -> HandlerResult:
        """``POST /v2/models/{name}/stream``: the HTTP form (streams/ndjson.py)."""
        if request.method != "POST":
            raise MethodNotAllowed("a stream is a WebSocket (GET) or NDJSON (POST)", ("POST",))
        if request.stream is None:
            raise BadRequest("the HTTP form of a stream takes a body: one JSON item per line")
        check_ndjson(request)
        executor, spec, stream_id = self._prepare(request)
        session = self._attach(request, executor, spec, stream_id)
        return open_stream(self, request, session)

    def _prepare(self, request: Request) -> tuple[Executor, Streaming, str]:
        """The model, its stream spec and the stream's id for ``request``; HTTPError if none."""
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
        request.model = name
        return executor, spec, stream_id

    def _attach(
        self, request: Request, executor: Executor, spec: Streaming, stream_id: str
    ) -> Session:
        name = executor.model.name
        try:
            state = self.store.attach(_fresh(executor, spec, (name, stream_id)), self.hub.clock())
        except Full as exc:
            raise ServiceUnavailable(str(exc)) from None
        except InUse as exc:
            raise Conflict(str(exc)) from None
        session = Session(self, executor, spec, state, self._may_train(executor, request))
        self.sessions[state.key] = session
        return session

    def watch(self, request: Request) -> HandlerResult:
        """``GET /v2/models/{name}/stream?stream=ID`` with ``Accept: text/event-stream``: the
        answers of an open stream as server-sent events (streams/watch.py)."""
        if request.method != "GET":
            raise MethodNotAllowed("a stream is a WebSocket (GET) or NDJSON (POST)", ("GET",))
        accept = request.header(b"accept") or b""
        if EVENT_STREAM not in accept:
            raise BadRequest(
                "this is a stream: open it as a WebSocket (Upgrade: websocket), send it NDJSON "
                "(POST), or follow its answers with Accept: text/event-stream and ?stream=ID"
            )
        executor, _spec, stream_id = self._prepare(request)
        if _query(request.query, "stream") is None:
            raise BadRequest("say which stream to follow: ?stream=ID")
        session = self.sessions.get((executor.model.name, stream_id))
        if session is None:
            raise NotFound(f"stream {stream_id!r} is not open")
        if len(session.watchers) >= MAX_WATCHERS:
            raise ServiceUnavailable(f"stream {stream_id!r} has {MAX_WATCHERS} watchers already")
        watcher = Watcher()
        session.watchers.append(watcher)
        return Response(
            200, b"", EVENT_STREAM, headers=((b"cache-control", b"no-store"),), stream=watcher
        )

    def _may_train(self, executor: Executor, request: Request) -> str | None:
        """None when the stream's labels may train the model, else why not: training is off,
        or the opening request lacks the token or comes from another site's page (labels
        change the model: the rules of the HTTP train endpoints, SECURITY.md)."""
        if executor.training is None:
            return f"model {executor.model.name!r} does not train (train.enabled)"
        if self.auth is not None:
            try:
                self.auth.check_sender(request)
                self.auth.check(request)
            except HTTPError as exc:
                return exc.message
        return None

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
        yield CounterMetricFamily(
            "webtorch_streams_labels",
            "Labelled stream items handed to the trainer",
            value=stats.labels,
        )
        yield CounterMetricFamily(
            "webtorch_streams_labels_trained",
            "Labelled stream items the trainer applied",
            value=stats.trained,
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


Targets = dict[str, np.ndarray]
# A queued item: its id, its array, when it arrived, the label it came with.
Queued = tuple[Any, np.ndarray, float, Targets | None]


class Session:
    """One open stream: its connection, its queue of items, the one in flight; for a model
    that trains, the inputs of its recent items, which a label turns into a train request."""

    def __init__(
        self,
        owner: ModelStreams,
        executor: Executor,
        spec: Streaming,
        state: StreamState,
        no_training: str | None,
    ) -> None:
        self.owner = owner
        self.executor = executor
        self.spec = spec
        self.state = state
        self.no_training = no_training  # why labels are refused (None: they train)
        self.ws: Channel | None = None
        self.watchers: list[Watcher] = []  # SSE responses following the answers
        # Told when nothing is queued or in flight (the NDJSON form ends its answer then).
        self.on_idle: Callable[[], None] | None = None
        model = executor.model
        item = next(t for t in model.inputs if t.name == spec.item)
        self.item_shape = item.shape[2:] if spec.window else item.shape[1:]
        self.item_dtype = item.dtype.numpy
        # A binary message's row: its dtype (little-endian), shape and size in bytes.
        wire = self.item_dtype.newbyteorder("<")
        self._row = (wire, self.item_shape, wire.itemsize * math.prod(self.item_shape))
        self.outputs = [t.name for t in model.outputs]
        if spec.state is not None:
            self.outputs.remove(spec.state[1])
        self.targets = model.targets
        self.queue: deque[Queued] = deque()
        self.in_flight: tuple[Any, float] | None = None
        self._stash: Mapping[str, np.ndarray] | None = None
        self.ended = False
        settings = owner.hub.settings
        self.max_pending = settings.max_pending
        self.label_window = settings.label_window if no_training is None else 0
        # The inputs each recent item ran with, by id, oldest first: what a later label trains.
        self.recent: OrderedDict[Any, dict[str, InputData]] = OrderedDict()
        self.training = 0  # train requests not yet answered
        self._hello_sent = False
        self.received = state.count  # items of the stream received (a resumed one's included)

    def hello(self) -> str:
        """The stream's first answer: its id, and whether it resumes a stored state."""
        return orjson.dumps({"stream": self.state.key[1], "resumed": self.state.count > 0}).decode()

    def flush_hello(self) -> None:
        """The stream's name went out: items that came with the handshake may be run now."""
        self._hello_sent = True
        self._next()

    # -- Handler ------------------------------------------------------------------------------

    def message(self, ws: Channel, data: str | bytes) -> None:
        """One item (a JSON object), or several in order (a JSON array of them: a device that
        sends a few samples per message saves the framing of the others); or, in a binary
        message, one or more items as the item input's rows, little-endian (no JSON to parse:
        the cheapest form)."""
        if isinstance(data, bytes):
            self._binary(ws, data)
            return
        try:
            doc = self._parse(data)
        except HTTPError as exc:
            self.owner.stats.errors += 1
            ws.send(orjson.dumps({"error": exc.message}).decode())
            return
        if isinstance(doc, list):
            for one in doc:
                self._one(ws, one)
        else:
            self._one(ws, doc)
        if len(self.queue) + 1 >= self.max_pending:
            ws.hold(True)
        if self._hello_sent:
            self._next()

    def _one(self, ws: Channel, doc: Any) -> None:
        try:
            if not isinstance(doc, dict):
                raise BadRequest("an item is a JSON object")
            if "for" in doc:
                self._label_later(doc)
                return
            number = self.received  # the item's number in the stream: its default id
            item_id, item = self._item(doc, number)
            label = doc.get("label")
            targets = None if label is None else self._label(item_id, label)
        except HTTPError as exc:
            self.owner.stats.errors += 1
            ws.send(orjson.dumps({"error": exc.message}).decode())
            return
        self.received += 1
        self.queue.append((item_id, item, _clock(), targets))

    def _binary(self, ws: Channel, data: bytes) -> None:
        """Items as raw rows: each the item input's shape and dtype, little-endian, numbered
        in arrival order (no id, no label: those take the JSON form)."""
        dtype, shape, size = self._row
        if size <= 0:  # the item's shape has a free dimension: rows have no fixed size
            self.owner.stats.errors += 1
            ws.send('{"error":"this model\'s item shape is not fixed: send items as JSON"}')
            return
        if len(data) == size:  # one item: the common case, without the reshaping
            self.queue.append((self.received, self._rows(data).reshape(shape), _clock(), None))
            self.received += 1
        elif not data or len(data) % size:
            self.owner.stats.errors += 1
            ws.send(
                orjson.dumps(
                    {
                        "error": f"a binary message is items of {list(shape)} {dtype.name} "
                        f"little-endian, {size} bytes each: {len(data)} bytes is not a "
                        "whole number of them"
                    }
                ).decode()
            )
            return
        else:
            now = _clock()
            number = self.received
            append = self.queue.append
            for row in self._rows(data).reshape(-1, *shape):
                append((number, row, now, None))
                number += 1
            self.received = number
        if len(self.queue) + 1 >= self.max_pending:
            ws.hold(True)
        if self._hello_sent:
            self._next()

    def _rows(self, data: bytes) -> np.ndarray:
        """The items' values, flat: native byte order and writable (a copy: the executor may
        hand the array to torch as it is)."""
        return np.frombuffer(data, self._row[0]).astype(self.item_dtype)

    def closed(self, ws: Channel | None, code: int) -> None:
        if self.owner.sessions.get(self.state.key) is self:
            del self.owner.sessions[self.state.key]
        for watcher in self.watchers:
            watcher.end()
        self.watchers = []
        self.ended = True
        self.queue.clear()
        self.recent.clear()
        if self.in_flight is None:
            self.owner.store.detach(self.state, self.owner.hub.clock())
        # else: detached when its answer comes, its state updated first (a resume sees it)

    # -- decoding -----------------------------------------------------------------------------

    def _parse(self, data: str) -> dict[str, Any] | list[Any]:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"an item is a JSON object: {exc}") from None
        if not isinstance(doc, dict | list):
            raise BadRequest("an item is a JSON object (or an array of them)")
        return doc

    def _item(self, doc: dict[str, Any], number: int) -> tuple[Any, np.ndarray]:
        item_id = doc.get("id", number)
        if not isinstance(item_id, int | str) or (isinstance(item_id, str) and len(item_id) > 64):
            raise BadRequest("`id` is an integer or a string of at most 64 characters")
        name = self.spec.item
        if name not in doc:
            raise BadRequest(f"item {item_id!r}: no {name!r}")
        return item_id, self._array(item_id, name, doc[name], self.item_shape, self.item_dtype)

    def _array(
        self, item_id: Any, name: str, value: Any, shape: tuple[int, ...], dtype: np.dtype[Any]
    ) -> np.ndarray:
        try:
            array = np.asarray(value, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"item {item_id!r}: {name!r} is not numbers: {exc}") from None
        if array.shape != tuple(shape):
            raise BadRequest(
                f"item {item_id!r}: {name!r} has shape {list(array.shape)}, expected {list(shape)}"
            )
        return array

    def _label(self, item_id: Any, label: Any) -> Targets:
        """An item's label, checked against the model's targets."""
        if self.no_training is not None:
            raise BadRequest(f"item {item_id!r}: labels are not taken here: {self.no_training}")
        if not isinstance(label, dict):
            raise BadRequest(f"item {item_id!r}: a label is an object of the model's targets")
        targets = {}
        for spec in self.targets:
            if spec.name not in label:
                raise BadRequest(f"item {item_id!r}: the label has no {spec.name!r}")
            value = self._array(
                item_id, spec.name, label[spec.name], spec.shape[1:], spec.dtype.numpy
            )
            targets[spec.name] = value[None]  # one row
        return targets

    def _label_later(self, doc: dict[str, Any]) -> None:
        """``{"for": ID, "label": {...}}``: the label of an item sent before."""
        item_id = doc["for"]
        targets = self._label(item_id, doc.get("label"))
        inputs = self.recent.pop(item_id, None)
        if inputs is not None:
            self._train(item_id, inputs, targets)
            return
        for i, queued in enumerate(self.queue):  # not run yet: it takes the label along
            if queued[0] == item_id:
                self.queue[i] = (*queued[:3], targets)
                return
        raise BadRequest(
            f"item {item_id!r} is not among this stream's last {self.label_window} items "
            "(streams.label_window), or completed no window"
        )

    # -- running ------------------------------------------------------------------------------

    def _next(self) -> None:
        """Run the next queued item, if none is in flight (its state is the last one's)."""
        while self.in_flight is None and self.queue and not self.ended:
            item_id, item, arrived, targets = self.queue.popleft()
            state, spec = self.state, self.spec
            inputs: dict[str, InputData]
            if spec.window:
                state.push(item)
                seen = state.count
                k = spec.window
                if seen < k or (seen - k) % spec.every:
                    continue  # no answer for this item: its window is not due
                inputs = {spec.item: state.recent()[None]}
            else:
                state.count += 1
                inputs = {spec.item: item[None]}
                if spec.state is not None:
                    assert state.state is not None
                    # A copy: the stored state changes with the answer, the train input not.
                    inputs[spec.state[0]] = state.state[None].copy()
            try:
                pending = self.executor.submit(inputs, 1, self._encode)
            except HTTPError as exc:
                self._answer_error(item_id, exc.message)
                continue
            self.in_flight = (item_id, arrived)
            if targets is not None:
                self._train(item_id, inputs, targets)
            elif self.label_window:
                recent = self.recent
                recent[item_id] = inputs
                if len(recent) > self.label_window:
                    recent.popitem(last=False)
            pending.subscribe(self._done, None)
        ws = self.ws
        if ws is not None and ws.held and len(self.queue) + 1 < self.max_pending:
            ws.hold(False)
        if self.in_flight is None and not self.queue and self.on_idle is not None:
            self.on_idle()

    def _encode(self, outputs: dict[str, np.ndarray]) -> Response:
        self._stash = outputs
        return _DONE

    def _done(self, _arg: None, response: Response) -> None:
        in_flight, self.in_flight = self.in_flight, None
        assert in_flight is not None
        item_id, arrived = in_flight
        outputs, self._stash = self._stash, None
        if response is not _DONE or outputs is None:
            self._answer_error(item_id, _error_of(response))
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

    def _train(self, item_id: Any, inputs: dict[str, InputData], targets: Targets) -> None:
        """A labelled item to the model's trainer (its WAL, its step); answered on the stream
        once the step is applied: ``{"id": ID, "trained": {"loss": ..., "step": ...}}``."""
        from webtorch.train.forms import TrainRequest  # with torch, as the executor is

        request = TrainRequest(dict(inputs), dict(targets), 1)
        try:
            pending = self.executor.submit_train(request, _train_encode)
        except HTTPError as exc:
            self._send(orjson.dumps({"id": item_id, "error": exc.message}))
            return
        self.owner.stats.labels += 1
        pending.subscribe(self._trained, item_id)

    def _trained(self, item_id: Any, response: Response) -> None:
        if response.status == 200:
            self.owner.stats.trained += 1
            self._send(b'{"id":%s,"trained":%s}' % (orjson.dumps(item_id), response.body))
        else:
            self._send(orjson.dumps({"id": item_id, "error": _error_of(response)}))

    def _answer_error(self, item_id: Any, message: str) -> None:
        self.owner.stats.errors += 1
        self._send(orjson.dumps({"id": item_id, "error": message}))
        if self.ws is not None and "queue is full" in message:
            self.ws.close(TRY_LATER, "model queue is full")

    def _send(self, data: bytes) -> None:
        ws = self.ws
        if ws is not None and not self.ended:
            ws.send(data.decode())
            if self.watchers:
                self.watchers = [w for w in self.watchers if w.push(data)]


def _train_encode(request: TrainRequest, loss: float, step: int) -> Response:
    return json_response({"loss": loss, "step": step})


def _error_of(response: Response) -> str:
    try:
        return str(orjson.loads(response.body).get("error", "model failed"))
    except (orjson.JSONDecodeError, AttributeError):
        return "model failed"
