"""The server side of HTTP/1.1: an asyncio Protocol driving httptools' parser.

Shaped like uvicorn's httptools protocol, but without ASGI: a request is handed to a plain handler
that answers a :class:`Response` at once or an awaitable resolved later (a batch future). That keeps
task creation off the hot path, which is what lets a Python server come within reach of nginx.

Per connection:
- requests are parsed as bytes arrive; pipelined requests get response *slots* in arrival order and
  responses are written strictly in that order, whatever order the handlers finish in;
- reading pauses while the transport's write buffer is full (the client is not reading) or while too
  many pipelined requests await answers, and resumes when both clear;
- limits are checked while parsing and answered with the right 4xx, after which the connection
  closes, because the parser cannot resynchronise on a broken stream;
- deadlines (header, body, keep-alive) are plain floats swept by :class:`ServerState`'s
  once-a-second tick, so the hot path never arms or cancels timers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from typing import Any, Final, Protocol, cast
from urllib.parse import unquote

import httptools

from webtorch.errors import (
    BadRequest,
    ExpectationFailed,
    FeatureNotImplemented,
    HeaderFieldsTooLarge,
    HTTPError,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    URITooLong,
    VersionNotSupported,
)
from webtorch.http.authority import host_problem
from webtorch.http.limits import Limits
from webtorch.http.messages import (
    COMMON_METHODS,
    Handler,
    HandlerResult,
    Pending,
    Request,
    RequestBody,
    Response,
    error_response,
    lower_name,
    response_for_error,
)
from webtorch.http.router import Route

log: Final = logging.getLogger("webtorch.http")

# Observer of finished requests: (request, status, seconds from last byte in to response ready).
Observer = Callable[[Request, int, float], None]
# The access log's hook: (request, status, body bytes sent, seconds from the request's arrival to
# its response ready, or for a streamed body to its last byte). Called once per request answered,
# and for requests refused while parsing (with what is known of them).
AccessLogger = Callable[[Request, int, int, float], None]


class ConnectionGate(Protocol):
    """Who may connect: asked once per connection, told when an admitted one ends."""

    def admit(self, address: str) -> bool: ...

    def release(self, address: str) -> None: ...


# Raises the HTTPError that would refuse a request, seen before its body is read (a client
# waiting for 100 Continue): Router.precheck.
ExpectCheck = Callable[[Request], None]
# The route of a path if its requests are dispatched as soon as their headers are in, the body
# following as a stream (proxied routes); None for routes that want the whole body first.
StreamMatch = Callable[[str], Route | None]

_REASONS: Final[dict[int, bytes]] = {
    100: b"Continue",
    200: b"OK",
    201: b"Created",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Content Too Large",
    414: b"URI Too Long",
    415: b"Unsupported Media Type",
    417: b"Expectation Failed",
    422: b"Unprocessable Content",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
_STATUS_LINES: Final[dict[int, bytes]] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()
}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_BUSY_BODY: Final = b'{"error":"too many connections open; retry shortly"}'
# The answer to a connection over the cap with none idle to make room: before its request is
# read, so it says close.
_AT_CAPACITY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s"
) % (len(_BUSY_BODY), _BUSY_BODY)
# Seconds between two log lines about the connection cap (each counts what happened since).
_CAP_LOG_INTERVAL: Final = 60.0
_HEX_BYTES: Final = [b"%02x" % n for n in range(256)]
_QUESTION: Final = ord("?")
_PERCENT: Final = ord("%")
_DOT: Final = ord(".")
# Request methods as str, made once: no decode per request, and the handlers' comparisons with
# the same constants hit on identity.
_METHOD_NAMES: Final = {m.encode(): m for m in COMMON_METHODS}
_NO_BODY_STATUSES: Final = frozenset({204, 304})
# An X-Request-Id kept as the client sent it: bounded, and token characters (with those of
# base64 and of URNs) only, so that it is safe in a header, a log line and upstream.
_SANE_REQUEST_ID: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z/=:@]{1,128}")


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Status\r\n" % status
    return line


class ServerState:
    """What all connections of one server share: handler, limits, open connections, the clock."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits | None = None,
        observer: Observer | None = None,
        server_name: bytes = b"webtorch",
        stream_match: StreamMatch | None = None,
        scheme: str = "http",
        access_log: AccessLogger | None = None,
        request_ids: bool = False,
    ) -> None:
        self.handler = handler
        self.limits = limits or Limits()
        self.observer = observer
        self.access_log = access_log
        self.request_ids = request_ids
        # Asked before a 100 Continue goes out; None: every request gets one.
        self.expect_check: ExpectCheck | None = None
        # Generated request ids: 16 random hex digits per server, then a 16-digit counter. 32 hex
        # digits, as nginx's $request_id and a W3C trace id; unique across restarts and workers
        # without a random draw per request.
        self._id_prefix = os.urandom(8).hex().encode()
        self._id_count = 0
        # The id's first 28 hex digits (prefix and the counter's high digits), remade once every
        # 256 ids: the last two digits come from a table, so an id costs one concatenation
        # instead of a %x formatting (which mypyc cannot compile: 0.15 us per request).
        self._id_high = b""
        self.stream_match = stream_match
        self.scheme = scheme
        self.server_header = b"server: " + server_name + b"\r\n"
        self.connections: set[HttpProtocol] = set()
        # Told the body bytes of each response once they are sent (the metrics' byte counts).
        self.sent_observer: Callable[[Request, int], None] | None = None
        # Admits or refuses each new connection by its address (the guard's); None: all admitted.
        self.gate: ConnectionGate | None = None
        self.accepted = 0  # connections ever accepted (the metrics' counter)
        # Client connections open at once: limits.max_connections, which HttpServer lowers to
        # what the file descriptor limit leaves room for. Running out of descriptors locks
        # every client out (issue 19: 1,500 idle sockets did, silently); this cap bites first.
        self.max_connections = self.limits.max_connections
        self.reclaimed = 0  # idle connections closed at the cap to make room (ever)
        self.refused = 0  # connections refused at the cap (ever)
        self._cap_counts = [0, 0]  # reclaimed, refused: since the cap's last log line
        self._cap_log_at = 0.0  # the loop's time before which that line waits
        self.draining = False
        self.date_header = b""
        # Response heads up to "content-length: " by (status, content type); refreshed with Date.
        self.heads: dict[tuple[int, bytes | None], bytes] = {}
        # The head last asked for, and its key: see HttpProtocol._write.
        self.last_status = -1
        self.last_type: bytes | None = None
        self.last_head = b""
        self.tick()
        self._all_closed: asyncio.Event | None = None

    def tick(self, now: float | None = None) -> None:
        """Refresh the cached Date header and expire deadlines; called about once a second."""
        self.date_header = b"date: " + formatdate(time.time(), usegmt=True).encode() + b"\r\n"
        self.heads = {}
        self.last_status = -1
        if now is None:
            return
        for conn in list(self.connections):
            if conn.deadline is not None and now >= conn.deadline:
                conn.on_deadline()

    def head(self, status: int, content_type: bytes | None) -> bytes:
        """Status line, Server, Date and Content-Type, ending with ``content-length: ``."""
        key = (status, content_type)
        head = self.heads.get(key)
        if head is None:
            ctype = b"content-type: " + content_type + b"\r\n" if content_type is not None else b""
            head = status_line(status) + self.server_header + self.date_header + ctype
            head += b"content-length: "
            if len(self.heads) < 64:  # statuses x content types in use: few; stay bounded
                self.heads[key] = head
        self.last_status, self.last_type, self.last_head = status, content_type, head
        return head

    def new_request_id(self) -> bytes:
        count = self._id_count = self._id_count + 1
        low = count & 0xFF
        if low == 0 or not self._id_high:
            self._id_high = b"%s%014x" % (self._id_prefix, count >> 8)
        return b"%s%s" % (self._id_high, _HEX_BYTES[low])

    def make_room(self, now: float) -> bool:
        """At the connection cap: close the idle connection nearest its timeout (the one that
        would go first anyway), so that a new one fits; False when none is idle. nginx reuses
        idle keep-alive connections the same way when worker_connections run out. Scans the
        connections, but only at the cap, never per request."""
        victim: HttpProtocol | None = None
        nearest = (0.0, 0)
        for conn in self.connections:
            deadline = conn.deadline
            if deadline is not None and conn.idle():
                # The older connection first among equal deadlines (uvloop's clock counts ms).
                key = (deadline, conn.serial)
                if victim is None or key < nearest:
                    victim, nearest = conn, key
        counts = self._cap_counts
        if victim is not None:
            victim.reclaim()
            self.connections.discard(victim)  # now, not when the loop reports it closed
            self.reclaimed += 1
            counts[0] += 1
        else:
            self.refused += 1
            counts[1] += 1
        if now >= self._cap_log_at:
            self._cap_log_at = now + _CAP_LOG_INTERVAL
            log.warning(
                "connection cap reached: %d open (server.limits.max_connections, lowered to "
                "what ulimit -n allows); since the last report, %d idle connection(s) closed "
                "for new ones, %d new one(s) refused with 503",
                self.max_connections,
                counts[0],
                counts[1],
            )
            counts[0] = counts[1] = 0
        return victim is not None

    def connection_lost(self, conn: HttpProtocol) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    def start_draining(self) -> None:
        """Graceful shutdown: idle connections close now, busy ones after their last response."""
        self.draining = True
        self._all_closed = asyncio.Event()
        if not self.connections:
            self._all_closed.set()
        for conn in list(self.connections):
            conn.drain()

    async def wait_closed(self) -> None:
        if self._all_closed is not None:
            await self._all_closed.wait()


class _Slot:
    """One request's place in the connection's response order."""

    __slots__ = (
        "expect_continue",
        "head",
        "keep_alive",
        "pending",
        "request",
        "response",
        "started",
    )

    def __init__(self, head: bool, keep_alive: bool, started: float) -> None:
        self.head = head
        self.keep_alive = keep_alive
        self.started = started
        self.response: Response | None = None
        self.request: Request | None = None
        self.pending: Pending | None = None
        self.expect_continue = False


class _Sink:
    """Hands a streamed response body to its connection until the body ends or fails; calls
    after that (a source that has not noticed yet) are dropped."""

    __slots__ = ("chunked", "discard", "keep_alive", "protocol", "sent", "slot")

    def __init__(
        self, protocol: HttpProtocol, chunked: bool, keep_alive: bool, discard: bool, slot: _Slot
    ) -> None:
        self.protocol: HttpProtocol | None = protocol
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.discard = discard  # a HEAD request or a status without a body
        self.slot = slot
        self.sent = 0  # body bytes written (the access log's)

    def write(self, data: bytes) -> None:
        protocol = self.protocol
        if protocol is None or self.discard or not data:
            return
        transport = protocol.transport
        if transport is None:
            return
        self.sent += len(data)
        if self.chunked:
            transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            transport.write(data)

    def end(self) -> None:
        protocol = self.protocol
        if protocol is not None:
            self.protocol = None
            protocol.stream_ended(self)

    def abort(self) -> None:
        protocol = self.protocol
        if protocol is not None:
            self.protocol = None
            protocol.stream_aborted(self)


class _Ignore(Exception):
    """Raised inside a parser callback to drop the rest of the input (connection is closing)."""


class _Reject(Exception):
    """Raised inside a parser callback to abort parsing with an HTTP error."""

    def __init__(self, error: HTTPError) -> None:
        super().__init__(error.message)
        self.error = error


_IDLE: Final = 0
_HEADERS: Final = 1
_BODY: Final = 2
_WAIT: Final = 3
_SLICE: Final = 16384  # bytes parsed between two checks of whether reading should pause
_CONTENT_TYPE: Final = 0
_CONTENT_LENGTH: Final = 1
_TRANSFER_ENCODING: Final = 2
_EXPECT: Final = 3
_HOST: Final = 4
_REQUEST_ID: Final = 5
_CONNECTION: Final = 6
_SPECIAL_HEADERS: Final = {
    b"content-type": _CONTENT_TYPE,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"expect": _EXPECT,
    b"host": _HOST,
    b"x-request-id": _REQUEST_ID,
    b"connection": _CONNECTION,
}


# Bound once: a compiled module reads a Final name from a C static, not a module attribute.
_clock: Final = time.perf_counter


class HttpProtocol:
    """One client connection."""

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.state = state
        self.limits = state.limits
        self.loop = loop or asyncio.get_event_loop()
        # Bound once: per request, calling it saves a method lookup on the (uvloop) loop.
        self._time: Callable[[], float] = self.loop.time
        # Bound once: what a Pending calls with a response (a bound method made per request
        # would be an allocation per request).
        self._answer: Callable[[_Slot, Response], None] = self._deliver
        self.parser = httptools.HttpRequestParser(self)
        # Bound once, as _time: compiled code calls a method of a non-native object by name,
        # looking it up on every call.
        self._feed_data: Callable[[bytes], None] = self.parser.feed_data
        self.transport: asyncio.Transport | None = None
        self._send: Callable[[bytes], None] = _unconnected
        self.client = ""
        self.serial = 0  # the connection's place in accept order (see ServerState.make_room)
        self.deadline: float | None = None
        self.phase = _IDLE
        self.slots: deque[_Slot] = deque()
        self.tasks: set[asyncio.Future[Response]] = set()
        self.closing = False  # no more requests are read; close after the last response
        # Parsing is paused: the client is not reading its answers, too many requests await
        # theirs, or a streamed body's consumer lags. The socket is paused meanwhile, and
        # also while input already read waits in _unparsed (see _update_reading).
        self.read_paused = False
        self._socket_paused = False
        self.write_paused = False
        self.body_paused = False  # a streamed request body's consumer is not keeping up
        # The response whose body is being streamed: later responses wait for it to end.
        self._streaming: _Slot | None = None
        self._sink: _Sink | None = None
        # The request being received.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._head_raw = 0
        # The body received so far: its first chunk, and a list only when more follow (most
        # bodies arrive in one piece: no list to make per request).
        self._body = b""
        self._body_more: list[bytes] | None = None
        self._body_size = 0
        self._content_length: bytes | None = None
        self._chunked = False
        self._expect_continue = False
        self._content_type: bytes | None = None
        self._has_host = False
        self._has_connection = False  # a Connection header was received (see on_headers_complete)
        self._request_id: bytes | None = None  # the first X-Request-Id header received
        self._admitted = False  # counted by the state's gate, so released when the connection ends
        self._body_limit = self.limits.max_body
        self._stream: RequestBody | None = None  # the body of a request already dispatched
        self._peer_eof = False
        # Input held back while parsing is paused: a read, and how far into it parsing got
        # (an offset, so that resuming copies nothing: see _feed_slices).
        self._unparsed = b""
        self._unparsed_at = 0
        self._resume: asyncio.Handle | None = None
        self._slot: _Slot | None = None
        # The request line's method and version, read from the parser once per request (its
        # getters build a new object on every call; get_http_version formats a string).
        self._method = b""
        self._version = ""
        # The loop's time when the read being parsed arrived: the parser callbacks' deadlines
        # start from it (one clock read per read, not two per request).
        self._now = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement its interface.
        self.transport = cast(asyncio.Transport, transport)
        self._send = self.transport.write
        peer: Any = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client = str(peer[0])
        state = self.state
        state.accepted += 1
        self.serial = state.accepted
        gate = state.gate
        if gate is not None:
            if not gate.admit(self.client):
                # Refused before a byte is read (a denied or banned address, or one over its
                # connection cap): closing costs less than answering, and tells a flood nothing.
                self.closing = True
                self.transport = None
                cast(asyncio.Transport, transport).abort()
                return
            self._admitted = True
        # After the gate: a refused address must not cost an idle client its connection.
        if len(state.connections) >= state.max_connections and not state.make_room(self._time()):
            # At the cap, none idle: a quick, clear refusal, nothing read (the gate, if it
            # admitted it, is told in connection_lost, as for any other).
            self.closing = True
            self.transport = None
            cast(asyncio.Transport, transport).write(_AT_CAPACITY)
            transport.close()
            return
        self.state.connections.add(self)
        # A new connection must send its first request's headers within the header timeout.
        self.deadline = self._time() + self.limits.header_timeout
        if self.state.draining:
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.transport = None
        # Work started for this client stops: a proxied request frees its upstream connection.
        if self._stream is not None:
            self._stream.abort()
            self._stream = None
        logging_ = self.state.access_log is not None
        if self._streaming is not None:
            response = self._streaming.response
            self._streaming = None
            if self._sink is not None:
                self._sink.protocol = None
                if logging_ or self.state.sent_observer is not None:
                    self._log_stream(self._sink)  # cut short: the bytes that went out
                self._sink = None
            if response is not None and response.stream is not None:
                response.stream.cancel()
        for slot in self.slots:
            _abandon(slot)
            if logging_ and (slot.response is None or slot.response.stream is not None):
                # Not logged yet: the client left before its answer (nginx's 499).
                self._log(slot, 499, 0)
        for fut in list(self.tasks):
            fut.cancel()
        self.tasks.clear()
        self.slots.clear()
        self._unparsed = b""
        self._unparsed_at = 0
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self.state.connection_lost(self)
        if self._admitted:
            self._admitted = False
            gate = self.state.gate
            if gate is not None:
                gate.release(self.client)

    def idle(self) -> bool:
        """Waiting for a request with nothing owed (kept alive, or new and silent so far):
        closing it loses no work."""
        return (
            self.phase == _IDLE
            and not self.slots
            and not self.closing
            and self._streaming is None
            and not self._unparsed
            and self.transport is not None
        )

    def reclaim(self) -> None:
        """Closed to make room for a new connection (the cap: see ServerState.make_room)."""
        self.closing = True
        self.deadline = None
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.closing and self.phase not in (_HEADERS, _BODY):
            # Closing: no new request is read, but one already being received (when a graceful
            # drain began) is read to its end and answered.
            return
        if self._unparsed:
            # Not expected: the socket stays paused while held input waits (_update_reading).
            # Should a transport deliver anyway, nothing is lost or reordered.
            data = self._unparsed[self._unparsed_at :] + data
            self._unparsed = b""
            self._unparsed_at = 0
        if len(data) > _SLICE:
            self._feed_slices(data, 0)
        else:
            self._feed(data)

    def _feed_slices(self, data: bytes, pos: int) -> None:
        """Parse a large read from ``pos`` a slice at a time. pause_reading() only stops *future*
        reads, and a read can hold hundreds of pipelined requests: checking between slices makes
        a pause (client not reading, too many answers pending) take effect within the read. The
        rest waits in ``_unparsed`` (the read itself and an offset: no copy) until parsing
        resumes; the socket is not read meanwhile, so what a connection holds stays one read,
        and each byte is copied once (a slice), however many pauses it waits through."""
        end = len(data)
        while pos < end:
            if self.read_paused:
                self._unparsed = data
                self._unparsed_at = pos
                return
            if self.closing and self.phase not in (_HEADERS, _BODY):
                return
            self._feed(data[pos : pos + _SLICE])
            pos += _SLICE

    def _feed_unparsed(self) -> None:
        self._resume = None
        data, pos = self._unparsed, self._unparsed_at
        if not data or self.read_paused or self.transport is None:
            return
        self._unparsed = b""
        self._unparsed_at = 0
        self._feed_slices(data, pos)
        if not self._unparsed:
            self._update_reading()  # all of it parsed: the socket may be read again

    def _feed(self, data: bytes) -> None:
        if self.phase == _HEADERS:
            # Bytes of an unfinished header block: bound them before httptools buffers them all.
            # A separate count from on_header's: these reads may also carry the request line and,
            # in the read that ends the block, body bytes, which must not count as header bytes.
            self._head_raw += len(data)
        self._now = self._time()
        try:
            self._feed_data(data)
        except httptools.HttpParserUpgrade:
            # llhttp stops after the upgrade request's on_message_complete, by when the handler
            # may have answered already (phase back to _IDLE): that answer must be the only one.
            if self._slot is not None or self.phase in (_HEADERS, _BODY):
                self._fail_status(501, "protocol upgrade is not supported")
            else:
                # The request was answered as plain HTTP/1.1; the parser stops here, so close.
                self.closing = True
                if not self.slots and self.transport is not None:
                    self.transport.close()
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raises in HttpParserCallbackError, the original
            # being its __context__: that is how _Reject and _Ignore arrive here.
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._fail(cause.error)
            elif isinstance(cause, _Ignore) or (
                self.closing and self.phase not in (_HEADERS, _BODY)
            ):
                pass  # input after a request that closes the connection (llhttp refuses it)
            elif isinstance(exc, httptools.HttpParserCallbackError) and cause is not None:
                # A bug of ours in a callback, not the client's doing: logged, and the
                # connection closed, since its request may be half registered (answering
                # after it could leave an answer waiting forever for one that never comes).
                log.error("request handling failed", exc_info=cause)
                self.closing = True
                if self.transport is not None:
                    self.transport.close()
            else:
                self._fail(BadRequest(f"malformed HTTP request: {_describe(exc)}"))
        else:
            limit = self.limits.max_header_bytes + self.limits.max_url + 1024
            if self.phase == _HEADERS and self._head_raw > limit:
                self._fail(HeaderFieldsTooLarge("request header block is too large"))

    def eof_received(self) -> bool | None:
        """The client half-closed. Requests it already sent are still answered (a client may
        send, shut its side and read, as ``nc -N`` does); one it had not finished never will be,
        so then, or with nothing pending, the connection closes now."""
        self.closing = True
        self._peer_eof = True
        for slot in self.slots:
            pending = slot.pending
            if pending is not None and pending.response is None and pending.on_cancel is not None:
                # Work that asked to stop when its client leaves (a proxied request: nginx's
                # 499) is not awaited for a client that is gone: closing cancels it.
                return None
        if self.slots and self.phase not in (_HEADERS, _BODY):
            return True  # keep the transport open to write the pending responses
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        streaming = self._streaming
        if streaming is not None and streaming.response is not None:
            # The client stopped reading a streamed body: stop its source too, and give the
            # client as long as a body may take to read again (a slow-read attack ends there).
            assert streaming.response.stream is not None
            streaming.response.stream.pause()
            self.deadline = self._time() + self.limits.body_timeout
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        streaming = self._streaming
        if streaming is not None and streaming.response is not None:
            assert streaming.response.stream is not None
            self.deadline = None
            streaming.response.stream.resume()
        self._update_reading()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.closing:
            raise _Ignore
        self.phase = _HEADERS
        self.deadline = self._now + self.limits.header_timeout
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._head_raw = 0
        self._body = b""
        self._body_more = None
        self._body_size = 0
        self._content_length = None
        self._chunked = False
        self._expect_continue = False
        self._content_type = None
        self._has_host = False
        self._has_connection = False
        self._request_id = None
        self._body_limit = self.limits.max_body

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_url:
            raise _Reject(URITooLong(f"request target is longer than {self.limits.max_url} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        name = lower_name(name)
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.limits.max_header_bytes:
            raise _Reject(HeaderFieldsTooLarge("request header block is too large"))
        if len(self._headers) >= self.limits.max_headers:
            raise _Reject(
                HeaderFieldsTooLarge(f"more than {self.limits.max_headers} request headers")
            )
        special = _SPECIAL_HEADERS.get(name)
        if special is None:
            pass
        elif special == _CONTENT_TYPE:
            self._content_type = value
        elif special == _CONTENT_LENGTH:
            # Request smuggling: two different lengths, or a length beside chunked encoding.
            if self._content_length is not None and self._content_length != value.strip():
                raise _Reject(BadRequest("conflicting Content-Length headers"))
            self._content_length = value.strip()
            if self._chunked:
                raise _Reject(BadRequest("both Content-Length and Transfer-Encoding"))
        elif special == _TRANSFER_ENCODING:
            if self._content_length is not None:
                raise _Reject(BadRequest("both Content-Length and Transfer-Encoding"))
            codings = value.strip().lower()
            if codings != b"chunked":
                if codings.rpartition(b",")[2].strip() != b"chunked":
                    # No way to tell where the body ends (RFC 9112 6.3).
                    raise _Reject(BadRequest("Transfer-Encoding must end with 'chunked'"))
                # llhttp takes "gzip, chunked" and hands on the body still gzipped, as if plain
                # (a proxied route would forward it without its coding): refused, as nginx
                # does (RFC 9112 6.1).
                raise _Reject(
                    FeatureNotImplemented("only 'Transfer-Encoding: chunked' is supported")
                )
            self._chunked = True
        elif special == _HOST:
            if self._has_host:  # which one would an upstream believe? (RFC 9112 3.2: 400)
                raise _Reject(BadRequest("more than one Host header"))
            problem = host_problem(value)
            if problem is not None:
                raise _Reject(BadRequest(problem))
            self._has_host = True
        elif special == _REQUEST_ID:
            if self._request_id is None:
                self._request_id = value
        elif special == _CONNECTION:
            self._has_connection = True
        elif value.strip().lower() == b"100-continue":  # Expect
            self._expect_continue = True
        else:
            raise _Reject(ExpectationFailed("only 'Expect: 100-continue' is supported"))
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.phase = _BODY
        self._header_bytes = 0
        self.deadline = self._now + self.limits.body_timeout
        parser = self.parser
        parsed_keep_alive = bool(parser.should_keep_alive())
        if parsed_keep_alive and not self._has_connection:
            # llhttp keeps a connection alive by default only for HTTP/1.1 (major and minor both
            # above 0, of the versions it parses: 0.9, 1.0, 1.1, 2.0), so this is 1.1, known
            # without get_http_version(), which formats a new string each call (0.18 us).
            version = "1.1"
        else:
            version = parser.get_http_version()
        self._version = version
        method = self._method = parser.get_method()
        if version != "1.1" and version != "1.0":
            # llhttp parses "HTTP/2.0" or "HTTP/0.9" request lines; we speak 1.x only (as nginx).
            raise _Reject(VersionNotSupported(f"HTTP/{version} is not supported; use HTTP/1.1"))
        if not self._has_host and version == "1.1":
            raise _Reject(BadRequest("HTTP/1.1 request without a Host header"))  # RFC 9112 3.2
        length = 0
        if self._content_length is not None:
            try:
                length = int(self._content_length)
            except ValueError:
                raise _Reject(BadRequest("invalid Content-Length")) from None
        route: Route | None = None
        if (length or self._chunked) and self.state.stream_match is not None:
            target = self._target()
            if not isinstance(target, HTTPError):  # a bad target is answered at its end
                route = self.state.stream_match(target[0])
                if route is not None and route.max_body is not None:
                    self._body_limit = route.max_body
        if length > self._body_limit:
            raise _Reject(PayloadTooLarge(f"request body is larger than {self._body_limit} bytes"))
        if self._expect_continue and version == "1.1" and self.state.expect_check is not None:
            refusal = self._refusal()
            if refusal is not None:
                # Its final answer, not 100 Continue: the client need not send the body. The
                # connection closes after it (the body may come anyway: RFC 9110 10.1.1).
                raise _Reject(refusal)
        keep_alive = parsed_keep_alive and not self.closing
        slot = _Slot(method == b"HEAD", keep_alive, 0.0)
        self._slot = slot
        self.slots.append(slot)
        if self._expect_continue and version == "1.1":
            slot.expect_continue = True
            if self.slots[0] is slot:
                self._send_continue(slot)
        if route is not None:
            # Dispatch now and let the body follow as a stream: an upload of any size passes
            # through to the upstream in bounded memory.
            self._stream = RequestBody(self._set_body_paused)
            request = self._request(slot, b"", self._stream)
            if request is not None:
                request.route = route.name  # what the router does for the others
                self._dispatch(slot, request, route.handler)
            else:
                self._stream = None

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._body_limit:
            raise _Reject(PayloadTooLarge(f"request body is larger than {self._body_limit} bytes"))
        stream = self._stream
        if stream is not None:
            stream.feed(body)
            if not self.body_paused:
                # A streamed body may take long; what must not is the gap between two reads.
                self.deadline = self._now + self.limits.body_timeout
            return
        if not self._body:
            self._body = body
        elif self._body_more is None:
            self._body_more = [self._body, body]
        else:
            self._body_more.append(body)

    def on_message_complete(self) -> None:
        slot = self._slot
        assert slot is not None
        self._slot = None
        slot.expect_continue = False
        if self._stream is not None:
            # The request was dispatched at its headers; only the body's end is news.
            stream, self._stream = self._stream, None
            self.phase = _WAIT
            self.deadline = None
            if not slot.keep_alive:
                self.closing = True
            stream.finish()
            self._flush()  # it may have been answered while the body arrived
            return
        body = self._body if self._body_more is None else b"".join(self._body_more)
        self._body, self._body_more = b"", None  # an idle connection holds no old body
        request = self._request(slot, body, None)
        if request is None:
            return
        self.phase = _WAIT
        self.deadline = None
        self._dispatch(slot, request, self.state.handler)
        if not slot.keep_alive:
            # The client asked to close: read nothing more, answer what is pending.
            self.closing = True
        if self.read_paused or len(self.slots) >= self.limits.max_pipeline:
            self._update_reading()

    def _target(self) -> tuple[str, str, bytes] | HTTPError:
        """The request target as (decoded path, query, origin-form target), or what is wrong.

        The path is normalised (its dot segments removed, RFC 3986 5.2.4) before anything routes
        on it, and the normalised form is what a proxy forwards: ``/api/../admin`` is
        ``/admin`` here as at any upstream that resolves it, not a request for ``/api/``'s
        upstream that it turns into one for ``/admin`` (nginx normalises before matching its
        locations too). An absolute-form target's authority replaces the Host header."""
        url = self._url
        if (
            url.startswith(b"/")
            and _QUESTION not in url
            and _PERCENT not in url
            and _DOT not in url
        ):
            # The common case: no query, nothing escaped, no dot; partition would be a method
            # call looked up by name. The needles are ints: ``b"?" in url`` first tries its
            # needle as an int and formats a TypeError to clear (0.14 us each).
            return url.decode("latin-1"), "", url
        path_b, _, query_b = url.partition(b"?")
        rest = url[len(path_b) :]  # the query as received, with its "?" (forwarded untouched)
        absolute = False
        if not path_b.startswith(b"/"):
            if path_b[:8].lower().startswith((b"http://", b"https://")):
                parts = _absolute_form(url)
                if isinstance(parts, HTTPError):
                    return parts
                path_b, query_b, authority = parts
                rest = b"?" + query_b if query_b else b""
                absolute = True
                self._use_authority(authority)
            elif path_b != b"*" or query_b:
                # Authority-form (CONNECT's) and anything else: no route takes them.
                return BadRequest("request target must start with '/' (origin form)")
            elif self._method != b"OPTIONS":
                return BadRequest("the '*' request target is for OPTIONS only")
        target = url
        if path_b.startswith(b"/") and _dot_segment_in(path_b):
            normal = _remove_dot_segments(path_b)
            if isinstance(normal, HTTPError):
                return normal
            path_b = normal
            target = path_b + rest
        elif absolute:
            target = path_b + rest  # made origin-form
        path = path_b.decode("latin-1")
        if "%" in path:
            path = unquote(path)
            if _has_dot_segment(path):
                # Left after the dot segments went, one came from an encoded slash (%2F, as in
                # "a%2F..%2Fb"): %2F stays a character of its segment here and upstream (as
                # nginx forwards it), but a server that decodes it to a slash would resolve a
                # dot segment that this one did not: refused rather than routed one way and
                # served another.
                return BadRequest(
                    "an encoded slash (%2F) beside a '.' or '..' segment in the request path"
                )
        return path, query_b.decode("latin-1"), target

    def _use_authority(self, authority: bytes) -> None:
        """RFC 9112 3.2.2: a server receiving an absolute-form target MUST ignore the Host
        header and use the target's authority: it replaces Host in the request's headers, so
        that routing, the guard, the CSRF check and the proxy all see the one authority (the
        target's was checked like a Host header)."""
        headers = self._headers
        for i in range(len(headers)):
            if headers[i][0] == b"host":
                if headers[i][1] != authority:
                    headers[i] = (b"host", authority)
                return
        headers.append((b"host", authority))  # an HTTP/1.0 request may come without Host

    def _refusal(self) -> HTTPError | None:
        """What would refuse the request whose headers are in, asked of the state's
        expect_check before a 100 Continue invites its body: the interim answer goes out only
        once the request is routed, its route takes the method, and auth passes."""
        check = self.state.expect_check
        if check is None:
            return None
        target = self._target()
        if isinstance(target, HTTPError):
            return target
        method = self._method
        request = Request(
            _METHOD_NAMES.get(method) or method.decode("ascii", "replace"),
            target[0],
            target[1],
            self._headers,
            b"",
            self._version,
            False,
            self.client,
            raw_content_type=self._content_type,
            target=target[2],
            scheme=self.state.scheme,
        )
        try:
            check(request)
        except HTTPError as exc:
            return exc
        except Exception:  # a bug of ours: the request goes on, and its handler decides
            log.exception("pre-body check failed for %s %s", request.method, request.path)
        return None

    def _request(self, slot: _Slot, body: bytes, stream: RequestBody | None) -> Request | None:
        method = self._method
        name = _METHOD_NAMES.get(method)
        if name is None:
            if method == b"CONNECT":
                # A tunnel is not something WebTorch makes; a 2xx here would tell a client that
                # one is open (nginx answers 405 too).
                error = MethodNotAllowed(
                    "CONNECT is not supported (not a forward proxy)", COMMON_METHODS
                )
                self._finish_with_error(slot, error)
                return None
            name = method.decode("ascii")
        target = self._target()
        if isinstance(target, HTTPError):
            self._finish_with_error(slot, target)
            return None
        request = Request(
            name,
            target[0],
            target[1],
            self._headers,
            body,
            self._version,
            slot.keep_alive,
            self.client,
            "",
            self._content_type,
            target[2],
            stream,
            self.state.scheme,
            self._id() if self.state.request_ids else b"",
        )
        slot.request = request
        # uvloop's loop.time() counts whole milliseconds: fine for deadlines, not for latency.
        slot.started = _clock()
        return request

    def _id(self) -> bytes:
        """The request's id: the client's X-Request-Id when it is sane, else a new one."""
        incoming = self._request_id
        if incoming is not None and _SANE_REQUEST_ID.fullmatch(incoming):
            return incoming
        return self.state.new_request_id()

    def _refused_request(self) -> Request:
        """What is known of a request refused while it was parsed (for its X-Request-Id and the
        access log): its method and target when they had arrived."""
        method = path = query = ""
        if self.phase in (_HEADERS, _BODY) and self._url:
            # The target has begun, so the method before it was parsed.
            method = self.parser.get_method().decode("ascii", "replace")
            url = self._url[:1024].decode("latin-1")
            path, _, query = url.partition("?")
        request = Request(method, path, query, [], b"", client=self.client)
        if self.state.request_ids:
            request.request_id = self._id()
        return request

    def _log(self, slot: _Slot, status: int, sent: int) -> None:
        access_log = self.state.access_log
        request = slot.request
        if access_log is None or request is None:
            return
        try:
            access_log(request, status, sent, _clock() - slot.started)
        except Exception:  # a logging bug must not cost the client its response
            log.exception("access log failed")

    def _dispatch(self, slot: _Slot, request: Request, handler: Handler) -> None:
        try:
            result: HandlerResult = handler(request)
        except HTTPError as exc:
            result = response_for_error(exc)
        except Exception:
            log.exception("handler failed for %s %s", request.method, request.path)
            result = error_response(500, "internal server error")
        if isinstance(result, Response):
            self._deliver(slot, result)
        elif isinstance(result, Pending):
            slot.pending = result
            result.subscribe(self._answer, slot)
        else:
            try:
                fut = asyncio.ensure_future(result, loop=self.loop)
            except TypeError:
                log.error("handler for %s returned %r", request.path, type(result).__name__)
                self._deliver(slot, error_response(500, "internal server error"))
            else:
                self.tasks.add(fut)
                fut.add_done_callback(functools.partial(self._on_result, slot))

    # -- responses ----------------------------------------------------------------------------

    def _on_result(self, slot: _Slot, fut: asyncio.Future[Response]) -> None:
        self.tasks.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            response = fut.result()
        elif isinstance(exc, HTTPError):
            response = response_for_error(exc)
        else:
            log.error("handler failed", exc_info=exc)
            response = error_response(500, "internal server error")
        self._deliver(slot, response)

    def _deliver(self, slot: _Slot, response: Response) -> None:
        """A handler's response is ready: record it, write it if its turn has come."""
        if self.transport is None or slot.response is not None:
            # The client went away, or the request was already answered (its body broke a
            # limit while streaming): this response goes nowhere.
            if response.stream is not None:
                response.stream.cancel()
            return
        slot.response = response
        observer = self.state.observer
        if observer is not None and slot.request is not None:
            try:
                observer(slot.request, response.status, _clock() - slot.started)
            except Exception:  # a metrics bug must not cost the client its response
                log.exception("request observer failed")
        state = self.state
        if response.stream is None and (
            state.access_log is not None or state.sent_observer is not None
        ):
            # A streamed body is counted and logged when it ends, with the bytes that went out.
            status = response.status
            empty = slot.head or status in _NO_BODY_STATUSES
            sent = 0 if empty else len(response.body)
            if state.sent_observer is not None and slot.request is not None:
                state.sent_observer(slot.request, sent)
            self._log(slot, status, sent)
        slots = self.slots
        if (
            len(slots) == 1
            and slots[0] is slot
            and slot.keep_alive
            and self.phase == _WAIT
            and response.stream is None
            and not (self.closing or self.state.draining or self.read_paused)
        ):
            # The common case, what _flush would do in it: the only request in flight is
            # answered and the connection goes idle. Spelled out because it runs per request.
            slots.popleft()
            self._write(self.transport, response, slot, True)
            self.phase = _IDLE
            self.deadline = self._time() + self.limits.keepalive_timeout
        else:
            stream = self._stream
            if stream is not None and slot.request is not None and slot.request.stream is stream:
                stream.orphan()  # answered while its body arrives: unless taken, drop the rest
            if slots and slots[0] is slot:
                self._flush()

    def _flush(self) -> None:
        """Write every ready response at the head of the pipeline, in order."""
        if self._streaming is not None:
            return  # a body is still being streamed; the rest waits for its end
        slots = self.slots
        transport = self.transport
        while slots:
            slot = slots[0]
            response = slot.response
            if response is None:
                if slot.expect_continue:
                    self._send_continue(slot)
                break
            slots.popleft()
            if transport is None:
                return
            # Draining: requests already taken have run (perhaps a training step), so all of them
            # are answered; the last one, with no request left being received, says close.
            receiving = self.phase in (_HEADERS, _BODY)
            last = not slots and not receiving
            keep_alive = slot.keep_alive and not (self.state.draining and last)
            if response.stream is not None:
                self._start_stream(transport, response, slot, keep_alive)
                return
            self._write(transport, response, slot, keep_alive)
            if not keep_alive:
                self.closing = True
                slots.clear()
                self._linger(transport)
                return
        if not slots:
            if self.closing:
                if transport is not None and self.phase not in (_HEADERS, _BODY):
                    self._linger(transport)
            elif self.phase == _WAIT:
                self.phase = _IDLE
                self.deadline = self._time() + self.limits.keepalive_timeout
        if self.read_paused:
            self._update_reading()

    def _write(
        self, transport: asyncio.Transport, response: Response, slot: _Slot, keep_alive: bool
    ) -> None:
        body = response.body
        status = response.status
        request = slot.request
        plain = (
            keep_alive
            and not response.headers
            and not slot.head
            and status not in _NO_BODY_STATUSES
            and len(body) < 65536
            and (request is None or request.http_version != "1.0")
        )
        if plain:  # the common case: one cached head, one write
            state = self.state
            ctype = response.content_type
            if status == state.last_status and ctype is state.last_type:
                head = state.last_head  # most responses repeat the one before: no key to build
            else:
                head = state.head(status, ctype)
            size = len(body)
            if request is not None and request.request_id:
                self._send(
                    b"%s%d\r\nx-request-id: %s\r\n\r\n%s" % (head, size, request.request_id, body)
                )
            else:
                # One allocation: mypyc compiles bytes %-formatting of bytes and ints into a
                # single build, with no format string parsed at run time.
                self._send(b"%s%d\r\n\r\n%s" % (head, size, body))
            return
        parts = [status_line(status), self.state.server_header, self.state.date_header]
        if response.content_type is not None:
            parts.append(b"content-type: " + response.content_type + b"\r\n")
        if status not in _NO_BODY_STATUSES:
            length = response.content_length
            parts.append(b"content-length: %d\r\n" % (len(body) if length is None else length))
        for name, value in response.headers:
            parts.append(name + b": " + value + b"\r\n")
        if request is not None and request.request_id:
            parts.append(b"x-request-id: " + request.request_id + b"\r\n")
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        elif request is not None and request.http_version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if slot.head or status in _NO_BODY_STATUSES:
            transport.write(b"".join(parts))
        elif len(body) < 65536:
            parts.append(body)
            transport.write(b"".join(parts))
        else:
            transport.write(b"".join(parts))
            transport.write(body)

    def _start_stream(
        self, transport: asyncio.Transport, response: Response, slot: _Slot, keep_alive: bool
    ) -> None:
        """Write a streamed response's head and start its body. The body is framed by its
        Content-Length when known, else chunked, else (an HTTP/1.0 client) by closing."""
        status = response.status
        discard = slot.head or status in _NO_BODY_STATUSES
        http10 = slot.request is not None and slot.request.http_version == "1.0"
        chunked = response.content_length is None and not discard and not http10
        if response.content_length is None and not discard and http10:
            keep_alive = False
        parts = [status_line(status), self.state.server_header, self.state.date_header]
        if response.content_type is not None:
            parts.append(b"content-type: " + response.content_type + b"\r\n")
        if response.content_length is not None and status not in _NO_BODY_STATUSES:
            parts.append(b"content-length: %d\r\n" % response.content_length)
        elif chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        for name, value in response.headers:
            parts.append(name + b": " + value + b"\r\n")
        request = slot.request
        if request is not None and request.request_id:
            parts.append(b"x-request-id: " + request.request_id + b"\r\n")
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        elif http10:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        transport.write(b"".join(parts))
        self._streaming = slot
        sink = self._sink = _Sink(self, chunked, keep_alive, discard, slot)
        assert response.stream is not None
        response.stream.start(sink)
        if self.write_paused and self._sink is sink:
            response.stream.pause()

    def stream_ended(self, sink: _Sink) -> None:
        """A streamed body is complete: finish its framing, go on with the next response."""
        self._streaming = None
        self._sink = None
        if self.state.access_log is not None or self.state.sent_observer is not None:
            self._log_stream(sink)
        transport = self.transport
        if transport is None:
            return
        if sink.chunked:
            transport.write(b"0\r\n\r\n")
        if self.write_paused:
            self.deadline = None
        if not sink.keep_alive:
            self.closing = True
            self.slots.clear()
            self._linger(transport)
            return
        self._flush()

    def stream_aborted(self, sink: _Sink) -> None:
        """A streamed body broke off: close, so the client sees the truncation (a short
        Content-Length body, or no last chunk) instead of a complete-looking response."""
        self._streaming = None
        self._sink = None
        if self.state.access_log is not None or self.state.sent_observer is not None:
            self._log_stream(sink)
        self.closing = True
        self.slots.clear()
        if self.transport is not None:
            self.transport.close()

    def _log_stream(self, sink: _Sink) -> None:
        response = sink.slot.response
        if response is not None:
            sent_observer = self.state.sent_observer
            if sent_observer is not None and sink.slot.request is not None:
                sent_observer(sink.slot.request, sink.sent)
            self._log(sink.slot, response.status, sink.sent)

    def _set_body_paused(self, paused: bool) -> None:
        if paused == self.body_paused:
            return
        self.body_paused = paused
        if self.phase == _BODY:
            # Waiting for the consumer is not the client's delay: no body deadline meanwhile.
            self.deadline = None if paused else self._time() + self.limits.body_timeout
        self._update_reading()

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close after the last response. Half-close first when possible and keep discarding input
        for a moment (nginx's lingering close): closing a socket with unread request bytes sends
        a RST that can destroy the response (a 413 for an upload) before the client reads it."""
        if self._peer_eof:
            transport.close()  # both sides are done: nothing left to linger for
        elif transport.can_write_eof():
            transport.write_eof()
            self.phase = _WAIT
            self.deadline = self._time() + 2.0
            self._update_reading()
        else:
            transport.close()

    def _send_continue(self, slot: _Slot) -> None:
        slot.expect_continue = False
        if self.transport is not None:
            self.transport.write(_CONTINUE)

    # -- errors, deadlines, shutdown ----------------------------------------------------------

    def _fail(self, error: HTTPError) -> None:
        """Answer a protocol-level error after the pending responses, then close."""
        self._fail_response(response_for_error(error))

    def _fail_status(self, status: int, message: str) -> None:
        self._fail_response(error_response(status, message))

    def _fail_response(self, response: Response) -> None:
        slot = self._slot
        if slot is None:
            slot = _Slot(False, False, _clock())
            self.slots.append(slot)
        self._slot = None
        if self._stream is not None:
            # The request was dispatched with its body streaming: that work stops here.
            self._stream.abort()
            self._stream = None
            _abandon(slot)
        slot.keep_alive = False
        slot.expect_continue = False
        state = self.state
        if slot.request is None and (state.request_ids or state.access_log is not None):
            slot.request = self._refused_request()
            slot.started = _clock()
        if (
            state.access_log is not None
            and slot is not self._streaming  # its stream's end logs it
            and (slot.response is None or slot.response.stream is not None)  # else logged
        ):
            self._log(slot, response.status, len(response.body))
        slot.response = response
        self.closing = True
        self.phase = _WAIT
        self.deadline = None
        if self.slots[0] is slot:
            self._flush()
        self._update_reading()

    def _finish_with_error(self, slot: _Slot, error: HTTPError) -> None:
        self._slot = slot
        self._fail(error)

    def on_deadline(self) -> None:
        """A deadline passed: 408 for a request half received, a silent close when idle."""
        self.deadline = None
        if self.closing:
            if self.transport is not None:
                self.transport.close()
        elif self.phase in (_HEADERS, _BODY):
            what = "headers" if self.phase == _HEADERS else "body"
            self._fail(RequestTimeout(f"request {what} not received in time"))
        elif not self.slots and self.transport is not None:
            self.closing = True
            self.transport.close()

    def drain(self) -> None:
        """Stop taking new requests; close once the responses in flight are written."""
        self.closing = True
        if self.phase == _IDLE and not self.slots and self.transport is not None:
            self.transport.close()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None:
            return
        pause = self.write_paused or self.body_paused or len(self.slots) >= self.limits.max_pipeline
        self.read_paused = pause
        # The socket is read only once held input is parsed: resuming it at once would let a
        # client that pipelines without end grow what is held by a read per pause (issue 19:
        # 44-77 MB per connection, and a copy of it all on each resume).
        unparsed = bool(self._unparsed)
        socket_pause = pause or unparsed
        if socket_pause != self._socket_paused:
            self._socket_paused = socket_pause
            if socket_pause:
                transport.pause_reading()
            else:
                transport.resume_reading()
        if not pause and unparsed and self._resume is None:
            # Not now: this may run inside a parser callback, and the parser is not reentrant.
            self._resume = self.loop.call_soon(self._feed_unparsed)


def _absolute_form(url: bytes) -> tuple[bytes, bytes, bytes] | HTTPError:
    """(path, query, authority) of an absolute-form target (``http://host/path?query``, RFC 9112
    3.2.2), or what is wrong with it."""
    try:
        # Any, not httptools' type: its stub declares the URL's fields bytes (port int), but a
        # part missing from the target is None, and compiled code checks a value against its
        # declared type when it reads it: ``http://h/v2``, with no query, raised TypeError
        # there and the connection was dropped with a traceback logged (issue 19).
        parsed: Any = httptools.parse_url(url)
    except httptools.HttpParserError:
        # llhttp lets through targets that parse_url refuses (a bad port, say).
        return BadRequest("invalid absolute request target")
    userinfo: bytes | None = parsed.userinfo
    if userinfo is not None:
        # RFC 9110 4.2.4: userinfo in an http(s) URI is an error (and a way to disguise the
        # real host).
        return BadRequest("userinfo ('user@') in the request target is not allowed")
    # The authority as sent: from after "://" to the path, query or fragment.
    start = url.find(b"://") + 3
    end = len(url)
    for stop in (b"/", b"?", b"#"):
        found = url.find(stop, start)
        if 0 <= found < end:
            end = found
    authority = url[start:end]
    problem = host_problem(authority)
    if problem is not None:
        return BadRequest(f"the request target's authority: {problem}")
    path: bytes | None = parsed.path
    query: bytes | None = parsed.query
    # The fragment, if any, is dropped: it is never sent on to anyone (RFC 9110 4.2.5).
    return path or b"/", query or b"", authority


def _dot_segment_in(path: bytes) -> bool:
    """Whether ``path`` may hold a dot segment (``.`` or ``..``, ``%2e`` counting as a dot):
    one begins with ``/.`` or, escaped, ``/%2e``."""
    if path.find(b"/.") >= 0:
        return True
    return _PERCENT in path and path.lower().find(b"/%2e") >= 0


def _dot_count(segment: bytes) -> int:
    """1 for a ``.`` segment, 2 for ``..`` (``%2e``/``%2E`` decoded), else 0."""
    if not segment or len(segment) > 6:
        return 0
    if len(segment) > 2:
        segment = segment.lower().replace(b"%2e", b".")
    if segment == b".":
        return 1
    if segment == b"..":
        return 2
    return 0


def _remove_dot_segments(path: bytes) -> bytes | HTTPError:
    """``path`` (absolute, still percent-encoded) without its dot segments, as RFC 3986 5.2.4
    resolves them; a ``..`` that would climb above the root is refused, as nginx does, rather
    than dropped. Only ``/`` separates segments: an encoded ``%2F`` stays inside its segment
    (and empty segments stay: ``/a//b`` is not ``/a/b`` to every server)."""
    segments = path.split(b"/")
    kept: list[bytes] = []
    last = len(segments) - 1
    for i in range(1, last + 1):
        segment = segments[i]
        dots = _dot_count(segment)
        if dots == 0:
            kept.append(segment)
            continue
        if dots == 2:
            if not kept:
                return BadRequest("the request path climbs above the root with '..'")
            kept.pop()
        if i == last:
            kept.append(b"")  # "/a/b/.." is "/a/", a directory
    return b"/" + b"/".join(kept)


def _has_dot_segment(path: str) -> bool:
    """Whether a decoded path holds a ``.`` or ``..`` segment."""
    return "/./" in path or "/../" in path or path.endswith(("/.", "/.."))


def _unconnected(data: bytes) -> None:
    raise RuntimeError("no transport yet")


def _abandon(slot: _Slot) -> None:
    """The slot's response will never be written: stop the work behind it."""
    if slot.pending is not None:
        slot.pending.cancel()
    response = slot.response
    if response is not None and response.stream is not None:
        response.stream.cancel()


def _describe(exc: Exception) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__
