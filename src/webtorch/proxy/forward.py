"""One proxied request, from the client's request to the client's response, across attempts.

A :class:`Forward` is the whole life of one request through the proxy, as callbacks (no task per
request): pick an upstream, take a pooled connection, send the head and the body (streamed as it
arrives), read the response, and either relay it or, on a failure that the retry rules allow,
start again on another upstream. It is the request body's consumer, the connection's
:class:`Exchange` and, for large responses, the response body's :class:`BodySource`, so
backpressure crosses the proxy both ways:

- upload: the upstream socket's buffer fills -> the client body stream pauses -> the server stops
  reading that client;
- download: the client stops reading -> the response source pauses -> the upstream connection
  stops reading.

A response is buffered (and so still retryable until its last byte) when it declares a small
Content-Length; anything else streams, and once its head is relayed no retry can happen.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from webtorch.balance.base import Outcome, Upstream
from webtorch.http.client.connection import UpstreamConnection
from webtorch.http.messages import (
    BodySink,
    Headers,
    Pending,
    Request,
    Response,
    error_response,
)
from webtorch.proxy.headers import request_head, response_headers
from webtorch.proxy.retry import should_retry

# Bound once: a compiled module reads a Final name from a C static, not a module attribute.
_clock: Final = time.monotonic

if TYPE_CHECKING:
    from webtorch.proxy.upstream import ProxyRoute

# Responses up to this size are read whole before the client sees a byte, so a failure while
# reading them can still be retried elsewhere; larger ones stream.
BUFFER_LIMIT: Final = 64 * 1024
# A streamed response buffers at most this much before its client is ready to take it.
STREAM_HIGH_WATER: Final = 256 * 1024
# A request body is kept for a retry up to this size; beyond it, a failed upload is not retried.
REPLAY_LIMIT: Final = 1024 * 1024
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})
_SERVER_ERRORS: Final = frozenset({500, 502, 503, 504})
_NO_CHUNKS: Final[list[bytes]] = []  # never appended to: a placeholder until an attempt starts


class Forward:
    __slots__ = (
        "_buffer",
        "_buffered",
        "_ctype",
        "_ended",
        "_headers",
        "_mode",
        "_source_paused",
        "attached",
        "attempt",
        "body_done",
        "chunked_body",
        "conn",
        "done",
        "head_sent",
        "pending",
        "replay",
        "replay_bytes",
        "request",
        "response_started",
        "route",
        "sent_at",
        "sink",
        "stale_retry",
        "started_at",
        "status",
        "tried",
        "upstream",
    )

    def __init__(self, route: ProxyRoute, request: Request) -> None:
        self.route = route
        self.request = request
        self.pending = Pending()
        self.pending.on_cancel = self.cancel
        self.tried: list[Upstream] = []
        self.attempt = 0
        self.upstream: Upstream | None = None
        self.conn: UpstreamConnection | None = None
        self.started_at = _clock()
        self.sent_at = 0.0
        self.done = False
        self.head_sent = False  # the current attempt wrote (part of) the request
        self.response_started = False  # the client has the response head: no more retries
        self.stale_retry = False
        self.status = 0
        self.sink: BodySink | None = None
        # The request body as sent so far, for a retry (None once past REPLAY_LIMIT).
        self.replay: list[bytes] | None = [] if request.stream is not None else None
        self.replay_bytes = 0
        self.body_done = request.stream is None
        self.attached = False  # the request body stream delivers to this forward
        self.chunked_body = False
        self._mode = 0  # 0: awaiting head, 1: buffering the body, 2: streaming it
        self._buffer: list[bytes] = _NO_CHUNKS  # set per attempt by _next_attempt
        self._buffered = 0
        self._ended = 0  # before the sink is there: 1 the body ended, 2 it broke off
        self._ctype: bytes | None = None
        self._headers: Headers = []
        self._source_paused = False

    # -- attempts -----------------------------------------------------------------------------

    def run(self) -> Pending:
        now = self.started_at
        self.route.group.budget.record_request(now)
        self._next_attempt(now)
        return self.pending

    def _next_attempt(self, now: float, same: Upstream | None = None) -> None:
        group = self.route.group
        if same is not None:
            upstream = same
        else:
            tried = self.tried
            candidates = group.health.eligible(now)
            if tried:
                candidates = [u for u in candidates if u not in tried]
            if not candidates:
                self._give_up(503, f"no upstream of {group.name!r} is available")
                return
            picker = group.picker
            chosen = None
            if picker is not None:  # plugins choose or veto (plugins/runner.py Runner.pick)
                candidates, chosen = picker(self.request, candidates, self._policy)
                if not candidates:
                    self._give_up(503, f"the plugins left no upstream of {group.name!r}")
                    return
            upstream = group.choose(self.request, candidates, now) if chosen is None else chosen
            tried.append(upstream)
            if group.probing:
                group.send_probes(now)
        self.attempt += 1
        self.upstream = upstream
        self.request.upstream = upstream.address  # for the access log: the last one tried
        if self.attached and not self.body_done:
            # No connection until _send: the rest of the body waits in the client's stream
            # (bounded) rather than here, where it could outgrow the replay buffer.
            assert self.request.stream is not None
            self.request.stream.pause()
        upstream.inflight += 1
        self.sent_at = now
        self.head_sent = False
        if self._mode or self._buffered:  # a retry: forget what the failed attempt read
            self._mode = 0
            self._buffered = 0
        self._buffer = []
        conn = group.pools[upstream.index].acquire(self._connected)
        if conn is not None:
            self._send(conn)

    def _policy(self, candidates: Sequence[Upstream]) -> Upstream:
        """The group's choice among ``candidates`` (sticky cookie, then its policy), for the
        plugins' pick phase to ask (wrapping the policy)."""
        return self.route.group.choose(self.request, candidates, _clock())

    def _connected(self, conn: UpstreamConnection | None, outcome: Outcome, message: str) -> None:
        upstream = self.upstream
        if self.done or upstream is None:
            if conn is not None:
                conn.pool.release(conn, True)
            return
        if conn is None:
            if outcome is Outcome.CANCELLED:
                # The pool had no connection free in time: the upstream is busy, not broken.
                upstream.inflight -= 1
                self._retry_or_fail(Outcome.CANCELLED, None, message, observe=False)
            else:
                self._attempt_failed(outcome, None, message)
            return
        self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        request = self.request
        self.conn = conn
        self.head_sent = True
        upstream = self.upstream
        assert upstream is not None
        expect_body = request.method != "HEAD"
        stream = request.stream
        route = self.route
        if stream is None:
            body = request.body
            if body or request.method not in _NO_BODY_METHODS:
                framing = b"content-length: %d\r\n" % len(body)
            else:
                framing = b""
            head = request_head(request, route.trusted, framing, upstream.address.encode())
            conn.send(self, head + body if body else head, expect_body)
            return
        declared = request.header(b"content-length")
        self.chunked_body = declared is None
        framing = (
            b"transfer-encoding: chunked\r\n"
            if declared is None
            else b"content-length: %s\r\n" % declared.strip()
        )
        head = request_head(request, route.trusted, framing, upstream.address.encode())
        if not self.attached:
            conn.send(self, head, expect_body)
            self.attached = True
            stream.attach(self)  # what arrived so far comes at once, the rest as it arrives
            return
        # A retry: the body taken so far goes again, then the rest follows as it arrives.
        assert self.replay is not None
        parts = [head]
        parts += (self._frame(chunk) for chunk in self.replay)
        if self.body_done and self.chunked_body:
            parts.append(b"0\r\n\r\n")
        conn.send(self, b"".join(parts), expect_body)
        if not self.body_done:
            stream.resume()

    def _frame(self, data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data) if self.chunked_body else data

    # -- the request body (BodyConsumer) -------------------------------------------------------

    def on_body_data(self, data: bytes) -> None:
        replay = self.replay
        if replay is not None:
            self.replay_bytes += len(data)
            if self.replay_bytes <= REPLAY_LIMIT:
                replay.append(data)
            else:
                self.replay = None
        conn = self.conn
        if conn is not None and data:
            conn.write(self._frame(data))

    def on_body_end(self) -> None:
        self.body_done = True
        conn = self.conn
        if conn is not None and self.chunked_body:
            conn.write(b"0\r\n\r\n")

    def on_body_abort(self) -> None:
        self.cancel()

    def on_upstream_paused(self) -> None:
        if self.request.stream is not None:
            self.request.stream.pause()

    def on_upstream_resumed(self) -> None:
        if self.request.stream is not None:
            self.request.stream.resume()

    # -- the response (Exchange) ---------------------------------------------------------------

    def on_response_head(
        self, status: int, headers: Headers, content_length: int | None, bodyless: bool
    ) -> None:
        upstream = self.upstream
        assert upstream is not None
        now = _clock()
        self.status = status
        if status in _SERVER_ERRORS:
            self.route.group.observe(
                upstream, Outcome.SERVER_ERROR, now - self.sent_at, now, self.request
            )
            if self._may_retry(Outcome.SERVER_ERROR, status):
                # Another upstream gets the request; this answer is dropped. Its connection
                # could only be reused after reading its body, so it is closed.
                conn, self.conn = self.conn, None
                upstream.inflight -= 1
                if conn is not None:
                    conn.abandon()
                self._retry(Outcome.SERVER_ERROR)
                return
        else:
            self.route.group.observe(upstream, Outcome.OK, now - self.sent_at, now, self.request)
        ctype, kept = response_headers(headers, bool(self.request.request_id))
        cookie = self.route.group.cookie_for(self.request, upstream)
        if cookie is not None:
            kept.append(cookie)
        self._ctype = ctype
        self._headers = kept
        if bodyless:
            self._finish_response(Response(status, b"", ctype, kept, content_length=content_length))
        elif content_length is not None and content_length <= BUFFER_LIMIT:
            self._mode = 1
        else:
            self._mode = 2
            self.response_started = True
            self.pending.resolve(Response(status, b"", ctype, kept, self, content_length))

    def on_response_data(self, data: bytes) -> None:
        if self._mode == 2 and self.sink is not None:
            self.sink.write(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._mode == 2 and self._buffered > STREAM_HIGH_WATER and self.conn is not None:
            self.conn.pause_reading()  # its client is not ready for it yet

    def on_response_end(self) -> None:
        self.conn = None  # the connection goes back to its pool
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.inflight -= 1
        if self._mode == 1:
            # The common case, spelled out: a whole small response, relayed at once.
            buffer = self._buffer
            body = buffer[0] if len(buffer) == 1 else b"".join(buffer)
            if not self.done:
                self.done = True
                if self.request.stream is not None:
                    self._detach_body()
                self.pending.resolve(Response(self.status, body, self._ctype, self._headers))
        elif self._mode == 2:
            self.done = True
            self._detach_body()
            if self.sink is not None:
                self.sink.end()
            else:
                self._ended = 1

    def on_failure(self, outcome: Outcome, message: str) -> None:
        conn, self.conn = self.conn, None
        if self.response_started:
            # The client has part of the response already: nothing can be retried, it must
            # see the break.
            upstream = self.upstream
            if upstream is not None:
                upstream.inflight -= 1
                now = _clock()
                self.route.group.observe(upstream, outcome, now - self.sent_at, now, self.request)
                self.upstream = None
            self.done = True
            self._detach_body()
            if self.sink is not None:
                self.sink.abort()
            else:
                self._ended = 2
                self._buffer = []
            return
        stale = (
            conn is not None
            and conn.requests > 1
            and not conn.received_any
            and outcome is Outcome.RESET
            and not self.stale_retry
            and (self.request.method in _NO_BODY_METHODS or self.replay is not None)
        )
        if stale and self.upstream is not None:
            # A kept-alive connection the upstream had closed just as it was reused: a race
            # of idle timeouts, not a failure of the upstream. Once, on a fresh connection.
            self.stale_retry = True
            upstream = self.upstream
            upstream.inflight -= 1
            self.attempt -= 1
            self._next_attempt(_clock(), same=upstream)
            return
        self._attempt_failed(outcome, None, message)

    # -- failures and retries ------------------------------------------------------------------

    def _attempt_failed(self, outcome: Outcome, status: int | None, message: str) -> None:
        upstream = self.upstream
        assert upstream is not None
        upstream.inflight -= 1
        self._retry_or_fail(outcome, status, message, observe=True)

    def _retry_or_fail(
        self, outcome: Outcome, status: int | None, message: str, *, observe: bool
    ) -> None:
        upstream = self.upstream
        now = _clock()
        if observe and upstream is not None:
            self.route.group.observe(upstream, outcome, now - self.sent_at, now, self.request)
        self.conn = None
        if self._may_retry(outcome, status):
            self._retry(outcome)
            return
        if outcome is Outcome.TIMEOUT:
            self._give_up(504, message)
        elif outcome is Outcome.CANCELLED:
            self._give_up(503, message)
        else:
            self._give_up(502, message)

    def _may_retry(self, outcome: Outcome, status: int | None) -> bool:
        group = self.route.group
        sent = self.head_sent and outcome is not Outcome.CONNECT_FAILED
        if self.request.stream is not None and self.replay is None:
            return False  # the body is too large to send again
        if outcome is Outcome.CANCELLED:
            # No connection free in time: try another upstream as for a refused connection.
            outcome = Outcome.CONNECT_FAILED
        decision = should_retry(
            self.request.method,
            outcome,
            status,
            request_sent=sent,
            response_started=self.response_started,
            attempt=self.attempt,
            elapsed=_clock() - self.started_at,
            settings=group.retry,
            route_allows_non_idempotent=self.route.retry_non_idempotent,
        )
        if not decision.retry:
            return False
        now = _clock()
        if not any(u not in self.tried for u in group.health.eligible(now)):
            return False  # nowhere else to go: the client gets this failure, not a 503
        return group.budget.try_withdraw(now)

    def _retry(self, outcome: Outcome) -> None:
        self.route.group.retries += 1
        self.request.retries += 1
        self.upstream = None
        self._next_attempt(_clock())

    def _give_up(self, status: int, message: str) -> None:
        self.upstream = None
        self._finish_response(error_response(status, message))

    def _finish_response(self, response: Response) -> None:
        """The final answer, whole: relay it, and the exchange is over."""
        if self.done:
            return
        self.done = True
        self._detach_body()
        self.pending.resolve(response)

    def _detach_body(self) -> None:
        stream = self.request.stream
        if stream is not None and not stream.complete:
            stream.detach()

    # -- the response body (BodySource) ---------------------------------------------------------

    def start(self, sink: BodySink) -> None:
        """The client is ready for the body: what waited goes first, then the rest as read."""
        self.sink = sink
        waiting, self._buffer, self._buffered = self._buffer, [], 0
        for chunk in waiting:
            sink.write(chunk)
        if self._ended == 1:
            sink.end()
        elif self._ended == 2:
            sink.abort()
        elif self.conn is not None and not self._source_paused:
            self.conn.resume_reading()

    def cancel(self) -> None:
        """The client went away: free the upstream side (whatever of it is still held)."""
        self.done = True
        self._detach_body()
        conn, self.conn = self.conn, None
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.inflight -= 1
            if conn is None:
                self.route.group.pools[upstream.index].cancel_wait(self._connected)
        if conn is not None:
            conn.abandon()

    def pause(self) -> None:
        self._source_paused = True
        if self.conn is not None:
            self.conn.pause_reading()

    def resume(self) -> None:
        self._source_paused = False
        if self.conn is not None:
            self.conn.resume_reading()
