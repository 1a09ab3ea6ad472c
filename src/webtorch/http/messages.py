"""Request and Response as the rest of WebTorch sees them, and the HTTP-error boundary."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol

import orjson

from webtorch.errors import HTTPError

Headers = list[tuple[bytes, bytes]]

# Header names as received -> lower case. Clients and upstreams send the same few names on every
# message, so a lookup (the name's hash is computed once either way) replaces a bytes.lower() call,
# which mypyc cannot compile (a method looked up by name each time), and the lowered name comes
# back as the one cached object. Bounded: names are the peer's to choose.
_LOWERED: Final[dict[bytes, bytes]] = {}
_LOWERED_MAX: Final = 1024
_LOWERED_LONGEST: Final = 64


def lower_name(name: bytes) -> bytes:
    """``name.lower()``, from a cache for the names seen before."""
    lowered = _LOWERED.get(name)
    if lowered is None:
        lowered = name.lower()
        if len(_LOWERED) < _LOWERED_MAX and len(name) <= _LOWERED_LONGEST:
            _LOWERED[name] = lowered
    return lowered


JSON: Final = b"application/json"
# The methods nearly every request uses: the protocol and the proxy keep their str and bytes
# forms made once, instead of decoding or encoding one per request.
COMMON_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")


class Request:
    """A fully received request. Header names are lower-cased bytes, values raw bytes; for an
    absolute-form target, Host is the target's authority (RFC 9112 3.2.2).

    Request and Response are written-out classes, not dataclasses: compiled by mypyc, a
    dataclass keeps the ``__init__`` that the dataclasses module generates, interpreted
    bytecode (0.6 us per Request in benchmarks/hotpath.py); a written ``__init__`` is native.
    """

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: Headers,
        body: bytes,
        http_version: str = "1.1",
        keep_alive: bool = True,
        client: str = "",
        route: str = "",
        raw_content_type: bytes | None = None,
        target: bytes = b"",
        stream: RequestBody | None = None,
        scheme: str = "http",
        request_id: bytes = b"",
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.client = client
        # Set by the router: the metrics label of the route that handled the request.
        self.route = route
        # The Content-Type header as received; the protocol notes it while parsing headers.
        self.raw_content_type = raw_content_type
        # The request target as an origin-form path and query, undecoded (what a proxy
        # forwards), its path without dot segments (as ``path``: see http/target.py).
        self.target = target
        # A body that is still arriving (streamed routes only: proxying); ``body`` is then
        # empty.
        self.stream = stream
        # "https" when the connection is TLS.
        self.scheme = scheme
        # The request's id (X-Request-Id): the client's when it sent a sane one, else
        # generated; b"" when server.request_id is off. Sent upstream and back to the client.
        self.request_id = request_id
        # For the access log: the model that served the request, or the upstream address the
        # proxy sent it to last, why its policy chose that one, and how many retries went
        # elsewhere first.
        self.model = ""
        self.upstream = ""
        self.reason = ""
        self.retries = 0
        # The guard's decision (allow, throttle, block) and its higher score; "" / None: no
        # guard, or the detector did not run for this request.
        self.guard_action = ""
        self.guard_score: float | None = None
        # A pipeline's time per stage, its Server-Timing value (``clean;dur=0.410, ...``, ms),
        # for the access log.
        self.stages = ""
        # The plugins' context for this request (plugins/context.py); None without plugins.
        self.context: Any = None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path!r} from {self.client or '?'}>"

    def body_length(self) -> int | None:
        """The body's length: received, or for a body still streaming in its declared
        Content-Length (None when it has none: chunked)."""
        if self.stream is None:
            return len(self.body)
        declared = self.header(b"content-length")
        return int(declared) if declared is not None and declared.isdigit() else None

    def header(self, name: bytes) -> bytes | None:
        """First value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def content_type(self) -> bytes:
        """The media type, lower-cased, without parameters (b"" when absent)."""
        raw = self.raw_content_type
        if raw is None:
            return b""
        media = _MEDIA_TYPES.get(raw)
        if media is None:
            media = raw.split(b";", 1)[0].strip().lower()
            if len(_MEDIA_TYPES) < 256:  # clients send few distinct values; bound the cache
                _MEDIA_TYPES[raw] = media
        return media


_MEDIA_TYPES: Final[dict[bytes, bytes]] = {}


class Response:
    """An answer. A written-out class for the reason given on :class:`Request`."""

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        content_type: bytes | None = JSON,
        headers: Sequence[tuple[bytes, bytes]] = (),
        stream: BodySource | None = None,
        content_length: int | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        # A tuple by default: most responses have no extra headers and need no list allocated.
        self.headers = headers
        # The body arrives later from this source (a proxied response); ``body`` is then
        # unused.
        self.stream = stream
        # The Content-Length to declare when it is not len(body): a streamed body's length
        # (None: unknown, so chunked), or the length a HEAD response announces without
        # sending.
        self.content_length = content_length

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self.body)} bytes>"


class BodySink(Protocol):
    """Where a streamed response body goes: the client connection."""

    def write(self, data: bytes) -> None: ...

    def end(self) -> None:
        """The body is complete."""

    def abort(self) -> None:
        """The body cannot be completed (the upstream broke): the client must see a truncation."""


class BodySource(Protocol):
    """A streamed response body: started once the response's turn to be written has come.

    Flow control runs backwards: the sink calls :meth:`pause` when the client stops reading and
    :meth:`resume` when it reads again, and the source stops and restarts its own input.
    """

    def start(self, sink: BodySink) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def cancel(self) -> None:
        """The client went away: release whatever feeds the body."""


class RequestBody:
    """A request body handed on while it arrives, so that an upload of any size passes through
    in bounded memory.

    The connection feeds chunks in; one consumer attaches with :meth:`attach` and gets them as
    callbacks. Backpressure: chunks wait here until the consumer attaches, and while more than
    ``HIGH_WATER`` bytes wait, or while the consumer asked to :meth:`pause`, reading from the
    client stops (``set_paused``).
    """

    HIGH_WATER: Final = 256 * 1024

    __slots__ = (
        "_consumer",
        "_discarding",
        "_paused_by_consumer",
        "_set_paused",
        "_waiting",
        "_waiting_bytes",
        "aborted",
        "complete",
        "inspect",
        "received",
    )

    def __init__(self, set_paused: Callable[[bool], None]) -> None:
        self._set_paused = set_paused
        self._consumer: BodyConsumer | None = None
        self._discarding = False
        self._paused_by_consumer = False
        self._waiting: list[bytes] = []
        self._waiting_bytes = 0
        self.received = 0
        self.complete = False
        self.aborted = False
        # Reads each chunk as it arrives, before it goes anywhere (the guard's body scan); it
        # may refuse the body, which detaches the consumer. None once the consumer is done.
        self.inspect: Callable[[bytes], None] | None = None

    # -- the connection's side ---------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        inspect = self.inspect
        if inspect is not None:
            inspect(data)
        if self._discarding:
            return
        consumer = self._consumer
        if consumer is not None and not self._waiting and not self._paused_by_consumer:
            consumer.on_body_data(data)
            return
        self._waiting.append(data)
        self._waiting_bytes += len(data)
        if self._waiting_bytes > self.HIGH_WATER:
            self._set_paused(True)

    def finish(self) -> None:
        inspect = self.inspect
        if inspect is not None:
            inspect(b"")  # the end, before the consumer hears of it
        self.complete = True
        if self._consumer is not None and not self._waiting:
            self._consumer.on_body_end()

    def abort(self) -> None:
        """The client went away before the body was complete."""
        if self.complete or self.aborted:
            return
        self.aborted = True
        if self._consumer is not None:
            self._consumer.on_body_abort()

    # -- the consumer's side -----------------------------------------------------------------

    def attach(self, consumer: BodyConsumer) -> None:
        """Start delivering: what arrived so far at once, the rest as it comes."""
        self._consumer = consumer
        self._drain()

    def detach(self) -> None:
        """Stop delivering (the consumer is done with it); what still arrives is dropped, so
        the client can finish sending and the connection stays usable."""
        self._consumer = None
        self._discarding = True
        self.inspect = None
        self._waiting = []
        self._waiting_bytes = 0
        self._paused_by_consumer = False
        self._set_paused(False)

    def orphan(self) -> None:
        """The request was answered; if nobody took its body, the rest of it is dropped."""
        if self._consumer is None:
            self.detach()

    def pause(self) -> None:
        if not self._paused_by_consumer:
            self._paused_by_consumer = True
            self._set_paused(True)

    def resume(self) -> None:
        if self._paused_by_consumer:
            self._paused_by_consumer = False
            self._drain()

    def _drain(self) -> None:
        consumer = self._consumer
        while self._waiting and consumer is self._consumer and not self._paused_by_consumer:
            data = self._waiting.pop(0)
            self._waiting_bytes -= len(data)
            assert consumer is not None
            consumer.on_body_data(data)
        if self._paused_by_consumer or self._consumer is None:
            return
        self._set_paused(self._waiting_bytes > self.HIGH_WATER)
        if not self._waiting:
            if self.complete:
                self._consumer.on_body_end()
            elif self.aborted:
                self._consumer.on_body_abort()


class BodyConsumer(Protocol):
    """What a :class:`RequestBody` delivers to."""

    def on_body_data(self, data: bytes) -> None: ...

    def on_body_end(self) -> None: ...

    def on_body_abort(self) -> None: ...


class Pending:
    """A response promised for later and resolved by whoever owns the work (a model batch).

    Cheaper than an ``asyncio.Future`` on the hot path: resolving it calls the subscriber at once
    instead of scheduling callbacks for the next loop iteration, and it needs no loop. It is not
    thread-safe: resolve it on the event loop thread.
    """

    __slots__ = ("_arg", "_callback", "on_cancel", "response")

    def __init__(self) -> None:
        self.response: Response | None = None
        self._callback: Callable[[Any, Response], None] | None = None
        self._arg: Any = None
        # Called when the client goes away before the response: the work can stop.
        self.on_cancel: Callable[[], None] | None = None

    def cancel(self) -> None:
        if self.response is None:
            self._callback = self._arg = None
            on_cancel, self.on_cancel = self.on_cancel, None
            if on_cancel is not None:
                on_cancel()

    def resolve(self, response: Response) -> None:
        if self.response is not None:
            return
        self.response = response
        self.on_cancel = None  # nothing left to cancel; also breaks the cycle with its owner
        callback = self._callback
        if callback is not None:
            arg = self._arg
            self._callback = self._arg = None
            callback(arg, response)

    def subscribe(self, callback: Callable[[Any, Response], None], arg: Any) -> None:
        """Call ``callback(arg, response)`` when resolved (at once if it already is)."""
        if self.response is not None:
            callback(arg, self.response)
        else:
            self._callback = callback
            self._arg = arg


# A handler answers at once (a Response), later through a Pending (model batches: no task, no
# future), or through any other awaitable (coroutines, for handlers that do I/O).
HandlerResult = Response | Pending | Awaitable[Response]
Handler = Callable[[Request], HandlerResult]


def json_response(obj: Any, status: int = 200, headers: Headers | None = None) -> Response:
    return Response(status, orjson.dumps(obj), JSON, headers or [])


def error_response(status: int, message: str, headers: Headers | None = None) -> Response:
    return Response(status, orjson.dumps({"error": message}), JSON, headers or [])


def response_for_error(exc: HTTPError) -> Response:
    return error_response(exc.status, exc.message, list(exc.headers))
