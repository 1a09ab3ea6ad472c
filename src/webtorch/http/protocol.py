"""The server side of HTTP/1.1: an asyncio Protocol driving httptools' parser. The top layer of
a connection (http/connection.py lists the layers below): bytes in, parsed and checked against
the limits, requests out to the handler.

Shaped like uvicorn's httptools protocol, but without ASGI: a request is handed to a plain handler
that answers a :class:`Response` at once or an awaitable resolved later (a batch future). That keeps
task creation off the hot path, which is what lets a Python server come within reach of nginx.

Longer than the ~600 lines a module here keeps to, on purpose: every httptools callback and the
checks each makes on what it parsed (limits, Host, Expect, the refusals and their statuses) are one
sequence a reader follows top to bottom; the rest of a connection lives in the layers below.

Limits are checked while parsing and answered with the right 4xx, after which the connection
closes, because the parser cannot resynchronise on a broken stream. Deadlines (header, body,
keep-alive) are plain floats swept by :class:`ServerState`'s once-a-second tick, so the hot path
never arms or cancels timers.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any, Final, cast

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
from webtorch.http.connection import BODY, HEADERS, WAIT, Slot, abandon
from webtorch.http.messages import (
    COMMON_METHODS,
    Request,
    RequestBody,
    Response,
    error_response,
    lower_name,
    response_for_error,
)
from webtorch.http.router import Route
from webtorch.http.serialise import AT_CAPACITY
from webtorch.http.state import ServerState
from webtorch.http.streams import Streams
from webtorch.http.target import Target, request_target

log: Final = logging.getLogger("webtorch.http")

# Request methods as str, made once: no decode per request, and the handlers' comparisons with
# the same constants hit on identity.
_METHOD_NAMES: Final = {m.encode(): m for m in COMMON_METHODS}
# An X-Request-Id kept as the client sent it: bounded, and token characters (with those of
# base64 and of URNs) only, so that it is safe in a header, a log line and upstream.
_SANE_REQUEST_ID: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z/=:@]{1,128}")


class _Ignore(Exception):
    """Raised inside a parser callback to drop the rest of the input (connection is closing)."""


class _Reject(Exception):
    """Raised inside a parser callback to abort parsing with an HTTP error."""

    def __init__(self, error: HTTPError) -> None:
        super().__init__(error.message)
        self.error = error


_CONTENT_TYPE: Final = 0
_CONTENT_LENGTH: Final = 1
_TRANSFER_ENCODING: Final = 2
_EXPECT: Final = 3
_HOST: Final = 4
_REQUEST_ID: Final = 5
_CONNECTION: Final = 6
_UPGRADE: Final = 7
_SPECIAL_HEADERS: Final = {
    b"content-type": _CONTENT_TYPE,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"expect": _EXPECT,
    b"host": _HOST,
    b"x-request-id": _REQUEST_ID,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
}


# Bound once: a compiled module reads a Final name from a C static, not a module attribute.
_clock: Final = time.perf_counter


class HttpProtocol(Streams):
    """One client connection: its parser's callbacks, and the asyncio Protocol's."""

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(state, loop)
        self.parser = httptools.HttpRequestParser(self)
        # Bound once, as _time: compiled code calls a method of a non-native object by name,
        # looking it up on every call.
        self._feed_data: Callable[[bytes], None] = self.parser.feed_data
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
        self._websocket = False  # an Upgrade: websocket header was received
        # A WebSocket upgrade request, received: the state's upgrade hook takes it once the
        # parser has stopped (in _feed), instead of the handler.
        self._upgrading: Slot | None = None
        self._admitted = False  # counted by the state's gate, so released when the connection ends
        self._body_limit = self.limits.max_body
        self._slot: Slot | None = None
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
            cast(asyncio.Transport, transport).write(AT_CAPACITY)
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
        self._stop_stream()
        logging_ = self.state.access_log is not None
        for slot in self.slots:
            abandon(slot)
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

    def _feed(self, data: bytes) -> None:
        if self.phase == HEADERS:
            # Bytes of an unfinished header block: bound them before httptools buffers them all.
            # A separate count from on_header's: these reads may also carry the request line and,
            # in the read that ends the block, body bytes, which must not count as header bytes.
            self._head_raw += len(data)
        self._now = self._time()
        try:
            self._feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            upgrading = self._upgrading
            if upgrading is not None:
                self._upgrading = None
                self._switch(upgrading, data[int(exc.args[0]) :])
                return
            # llhttp stops after the upgrade request's on_message_complete, by when the handler
            # may have answered already (phase back to IDLE): that answer must be the only one.
            if self._slot is not None or self.phase in (HEADERS, BODY):
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
            elif isinstance(cause, _Ignore) or (self.closing and self.phase not in (HEADERS, BODY)):
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
            if self.phase == HEADERS and self._head_raw > limit:
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
        if self.slots and self.phase not in (HEADERS, BODY):
            return True  # keep the transport open to write the pending responses
        return None

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.closing:
            raise _Ignore
        self.phase = HEADERS
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
        self._websocket = False
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
        elif special == _UPGRADE:
            self._websocket = value.strip().lower() == b"websocket"
        elif value.strip().lower() == b"100-continue":  # Expect
            self._expect_continue = True
        else:
            raise _Reject(ExpectationFailed("only 'Expect: 100-continue' is supported"))
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.phase = BODY
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
            try:
                path = self._target()[0]
            except HTTPError:
                pass  # a bad target is answered at the request's end
            else:
                route = self.state.stream_match(path)
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
        slot = Slot(method == b"HEAD", keep_alive, 0.0)
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
            self.phase = WAIT
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
        self.phase = WAIT
        self.deadline = None
        if self._websocket and self.state.upgrade is not None and self.parser.should_upgrade():
            self._upgrading = slot  # taken in _feed, where the parser stops (streams/)
            return
        self._dispatch(slot, request, self.state.handler)
        if not slot.keep_alive:
            # The client asked to close: read nothing more, answer what is pending.
            self.closing = True
        if self.read_paused or len(self.slots) >= self.limits.max_pipeline:
            self._update_reading()

    def _switch(self, slot: Slot, rest: bytes) -> None:
        """A WebSocket upgrade request: the state's upgrade hook (streams/) refuses it, takes
        the transport over (this connection is then done with it), or leaves it to the handler
        as plain HTTP. ``rest``: what the client sent after the request."""
        request, transport, hook = slot.request, self.transport, self.state.upgrade
        assert request is not None and transport is not None and hook is not None
        slot.keep_alive = False  # the parser stopped: nothing more is read as HTTP
        self.closing = True
        answer = hook(request, transport, rest, self._release) if self.slots[0] is slot else False
        if answer is True:
            self._successor = cast(asyncio.Protocol, transport.get_protocol())
            self.slots.clear()
            self.transport = None
            self._admitted = False  # released by the new protocol's end (self._release)
            self.state.connection_lost(self)
        elif answer is False:
            self._dispatch(slot, request, self.state.handler)
        else:
            self._deliver(slot, answer)

    def _release(self) -> None:
        gate = self.state.gate
        if gate is not None:
            gate.release(self.client)

    def _target(self) -> Target:
        """The request's target (http/target.py); raises BadRequest for a bad one. An
        absolute-form target's authority replaces the Host header."""
        target = request_target(self._url, self._method)
        if target[3]:
            self._use_authority(target[3])
        return target

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
        try:
            target = self._target()
        except HTTPError as exc:
            return exc
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

    def _request(self, slot: Slot, body: bytes, stream: RequestBody | None) -> Request | None:
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
        try:
            target = self._target()
        except HTTPError as exc:
            self._finish_with_error(slot, exc)
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
        if self.phase in (HEADERS, BODY) and self._url:
            # The target has begun, so the method before it was parsed.
            method = self.parser.get_method().decode("ascii", "replace")
            url = self._url[:1024].decode("latin-1")
            path, _, query = url.partition("?")
        request = Request(method, path, query, [], b"", client=self.client)
        if self.state.request_ids:
            request.request_id = self._id()
        return request

    # -- errors, deadlines, shutdown ----------------------------------------------------------

    def _fail(self, error: HTTPError) -> None:
        """Answer a protocol-level error after the pending responses, then close."""
        self._fail_response(response_for_error(error))

    def _fail_status(self, status: int, message: str) -> None:
        self._fail_response(error_response(status, message))

    def _fail_response(self, response: Response) -> None:
        slot = self._slot
        if slot is None:
            slot = Slot(False, False, _clock())
            self.slots.append(slot)
        self._slot = None
        if self._stream is not None:
            # The request was dispatched with its body streaming: that work stops here.
            self._stream.abort()
            self._stream = None
            abandon(slot)
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
        self.phase = WAIT
        self.deadline = None
        if self.slots[0] is slot:
            self._flush()
        self._update_reading()

    def _finish_with_error(self, slot: Slot, error: HTTPError) -> None:
        self._slot = slot
        self._fail(error)

    def on_deadline(self) -> None:
        """A deadline passed: 408 for a request half received, a silent close when idle."""
        self.deadline = None
        if self.closing:
            if self.transport is not None:
                self.transport.close()
        elif self.phase in (HEADERS, BODY):
            what = "headers" if self.phase == HEADERS else "body"
            self._fail(RequestTimeout(f"request {what} not received in time"))
        elif not self.slots and self.transport is not None:
            self.closing = True
            self.transport.close()


def _describe(exc: Exception) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__
