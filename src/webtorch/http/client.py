"""The client side of HTTP/1.1, for talking to upstreams: connections and their pools.

Built like the server (``protocol.py``): an asyncio Protocol driving httptools' response parser,
with callbacks instead of tasks per request, because a proxied request pays for both sides and
the proxy must stay within reach of nginx. One request at a time per connection (no upstream
pipelining, as nginx); a connection is reused when both sides allow keep-alive.

Deadlines (connect, read, total, idle) are floats swept by :class:`UpstreamClient`'s periodic
tick instead of timers armed and cancelled per read.

The proxy's own requests (load probes, active health checks) go through the same connections
and parser with :func:`fetch`, a one-shot GET with a deadline, so that the limits on what an
upstream may send (head size, header count, invalid framing, 101) bound them too.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol, cast

import httptools

from webtorch.http.messages import Headers, lower_name
from webtorch.vocab import Outcome, Upstream

log: Final = logging.getLogger("webtorch.proxy")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    keepalive: int = 32  # idle connections kept per upstream (a burst's surplus: briefly)
    max_connections: int = 0  # open at once per upstream; 0: no limit
    idle_timeout: float = 60.0
    max_requests: int = 1000  # per connection; 0: no limit
    connect_timeout: float = 5.0
    read_timeout: float = 60.0  # between two reads while a response is awaited or arriving
    total_timeout: float = 0.0  # a whole exchange; 0: none
    # A response's head (status line, headers, and any interim 1xx heads before it) is refused
    # (502) above these: nginx's proxy_buffer_size. Without them an upstream could make the
    # proxy hold any amount of memory before a byte of body arrives.
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100


class Exchange(Protocol):
    """One request's use of a connection: what the connection reports to."""

    def on_response_head(
        self, status: int, headers: Headers, content_length: int | None, bodyless: bool
    ) -> None:
        """The status line and headers arrived; ``bodyless``: no body follows (HEAD, 204...)."""

    def on_response_data(self, data: bytes) -> None: ...

    def on_response_end(self) -> None: ...

    def on_failure(self, outcome: Outcome, message: str) -> None:
        """The exchange cannot complete (RESET or TIMEOUT); the connection is closed."""

    def on_upstream_paused(self) -> None:
        """The upstream is not reading the request body as fast as it is sent."""

    def on_upstream_resumed(self) -> None: ...


class _Stop(Exception):
    """Raised in a parser callback: the response is complete though the parser does not know
    (a HEAD response announces a body it does not send)."""


class _Invalid(Exception):
    """Raised in a parser callback: the response cannot be relayed (it breaks HTTP, a limit, or
    is one the proxy does not support); ``what`` says why, after the upstream's address."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


# What _finish leaves for data_received to do with the connection once the read is parsed.
_KEEP: Final = 1
_DROP: Final = 2
# A response's first bytes when it is a final (2xx-5xx) HTTP/1.1 response: see data_received.
_HTTP11: Final = b"HTTP/1.1 "
_TWO: Final = ord("2")
_FIVE: Final = ord("5")
# An upstream's problems (invalid responses, limits) are logged at most once per this many
# seconds per upstream, the rest counted: a misbehaving upstream must not flood the log.
WARN_INTERVAL: Final = 60.0


class UpstreamConnection:
    """One pooled connection to one upstream."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self._out: list[bytes] | None = None  # written at the pool flusher's next run
        self._new_parser()
        self.exchange: Exchange | None = None
        self.requests = 0
        self.deadline: float | None = None  # read deadline while an exchange is on
        self.total_deadline: float | None = None
        self.idle_since = 0.0
        self.closed = False
        self.received_any = False  # a byte of the current response came back
        self.reading_paused = False
        self._headers: Headers = []
        self._expect_body = True
        self._informational = False
        self._in_body = False
        self._close_delimited = False
        self._keep_alive = False
        self._length: int | None = None
        self._chunked = False
        self._connection = False  # the response has a Connection header
        # The response head so far: raw bytes read, bytes of its header lines. Both count
        # across interim (1xx) responses, so an endless stream of them is bounded too.
        self._in_head = False
        self._head_raw = 0
        self._header_bytes = 0
        # The response began with a final HTTP/1.1 status line (see data_received).
        self._http11 = False
        self._max_header_bytes = pool.settings.max_header_bytes
        self._max_headers = pool.settings.max_headers
        self._release = 0  # _KEEP or _DROP: a response ended; the pool gets it after the read

    def _new_parser(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self._feed_data: Callable[[bytes], None] = self.parser.feed_data  # bound, as pool.time

    # -- used by the exchange -----------------------------------------------------------------

    def send(self, exchange: Exchange, data: bytes, expect_body: bool) -> None:
        """Start an exchange: write the request head (and a body already at hand)."""
        settings = self.pool.settings
        now = self.pool.time()
        self.exchange = exchange
        self.requests += 1
        self.received_any = False
        self._expect_body = expect_body
        self._informational = False
        self._in_head = True
        self._head_raw = 0
        self._header_bytes = 0
        self._http11 = False
        self.deadline = now + settings.read_timeout
        self.total_deadline = now + settings.total_timeout if settings.total_timeout else None
        self._queue(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self._queue(data)

    def _queue(self, data: bytes) -> None:
        """Hold ``data`` for the pool's flusher (see :class:`Flusher`), after what is held."""
        out = self._out
        if out is None:
            self._out = [data]
            self.pool.flusher.add(self)
        else:
            out.append(data)

    def flush(self) -> None:
        """Write the output held since the last flush, in order."""
        out = self._out
        if out is None:
            return
        self._out = None
        if self.transport is not None and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def pause_reading(self) -> None:
        """The client is not reading the response: stop reading it from the upstream. The read
        deadline stops too; the client's side has its own."""
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.deadline = None
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.deadline = self.pool.time() + self.pool.settings.read_timeout
            self.transport.resume_reading()

    def abandon(self) -> None:
        """The exchange stops midway (its client left): the connection cannot be reused."""
        self.exchange = None
        self._out = None  # what was not sent yet is not sent
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._out = None
        exchange, self.exchange = self.exchange, None
        self.pool.forget(self)
        if exchange is None:
            return
        if self._in_body and self._close_delimited:
            exchange.on_response_end()  # the close is what ends such a body
        else:
            address = self.pool.upstream.address
            exchange.on_failure(Outcome.RESET, f"upstream {address}: {_reason(exc)}")

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:
            # An idle connection should say nothing; if it does, it cannot be trusted.
            self.close()
            return
        self.received_any = True
        if self._in_head:
            if not self._head_raw:
                # The response's first read, at its first byte: a reused connection is at a
                # message boundary with nothing buffered (bytes after a response close it). A
                # final HTTP/1.1 status line here is the version on_headers_complete would
                # otherwise read from the parser, formatted anew each time (0.25 us). Anything
                # else (an interim 1xx first, a read shorter than that, another version) asks
                # the parser.
                self._http11 = (
                    len(data) > 9 and data.startswith(_HTTP11) and _TWO <= data[9] <= _FIVE
                )
            # Bound the unfinished head before httptools buffers all of it (a header line is
            # only reported once whole): checked after the parse, while the head goes on.
            self._head_raw += len(data)
        try:
            self._feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Stop):
                self._new_parser()
                self._finish()
            elif isinstance(cause, _Invalid):
                self._invalid(cause.what)
            else:
                # A bug of ours (or of the exchange's callbacks), not the upstream's doing:
                # logged with its traceback once, and the exchange ends as a clear 502 instead
                # of escaping to the event loop ("Fatal error on transport").
                log.error(
                    "relaying a response of upstream %s failed",
                    self.pool.upstream.address,
                    exc_info=cause,
                )
                self._fail(
                    Outcome.RESET,
                    f"upstream {self.pool.upstream.address}: the response could not be relayed",
                )
        except httptools.HttpParserUpgrade:
            # llhttp stops at a 101 (on_headers_complete refuses those first) or a 2xx it takes
            # for the answer to a CONNECT: either way a protocol switch the proxy cannot follow.
            self._invalid("switched protocols; only HTTP/1.1 responses can be relayed")
        except httptools.HttpParserError as exc:
            self._invalid(f"sent an invalid response: {_reason(exc)}")
        else:
            if self._in_head:
                if self._head_raw > self._max_header_bytes and self.exchange is not None:
                    self._invalid(self._too_large())
            elif self.deadline is not None and self.exchange is not None:
                # The response goes on: the read deadline counts from this read. (After the
                # parse, so a response complete in this read, most of them, reads no clock.)
                self.deadline = self.pool.time() + self.pool.settings.read_timeout
        release = self._release
        if release:
            # Only now, after the whole read is parsed: bytes after the response in the same
            # read (a body longer than announced, a second response) must find no exchange,
            # so that they close the connection instead of answering the next request.
            self._release = 0
            self.pool.release(self, release == _KEEP)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.on_upstream_paused()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.on_upstream_resumed()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.exchange is None:
            # A response nobody asked for (after the one that was: a body longer than its
            # Content-Length, say). Relayed to the next request, it would answer the wrong
            # client: the connection is closed instead.
            raise _Invalid("sent more than one response to a request")
        self._headers = []
        self._length = None
        self._chunked = False
        self._connection = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = lower_name(name)
        headers = self._headers
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._max_header_bytes:
            raise _Invalid(self._too_large())
        if len(headers) >= self._max_headers:
            raise _Invalid(
                f"sent more than {self._max_headers} response headers (max_response_headers)"
            )
        headers.append((name, value))
        if name == b"content-length":
            # llhttp has refused a length that is not all digits, or two of them.
            self._length = int(value)
        elif name == b"transfer-encoding":
            # Only chunked can be relayed (the proxy frames the body anew for its client; a
            # gzip or unknown coding would reach it undeclared), and only once: as nginx.
            if self._chunked or value.strip().lower() != b"chunked":
                raise _Invalid("sent a Transfer-Encoding other than chunked")
            self._chunked = True
        elif name == b"connection":
            self._connection = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 or status > 599:
            if status == 101:
                raise _Invalid(
                    "answered 101 Switching Protocols; WebSocket proxying is not supported"
                )
            if status < 100 or status > 599:
                raise _Invalid(f"sent an invalid status code {status}")
            # 100 Continue, 103 Early Hints and friends: interim, never relayed (the client's
            # Expect was answered by the server already); the real response follows.
            self._informational = True
            return
        exchange = self.exchange
        if exchange is None:
            return
        self._in_head = False
        length = self._length
        chunked = self._chunked
        keep_alive = bool(self.parser.should_keep_alive())
        if (not keep_alive or self._connection) and not self._http11:
            # llhttp keeps a connection alive by default only for HTTP/1.1, so the common case
            # (kept alive, no Connection header) is 1.1 without formatting the version, as is
            # a response whose first bytes said so (nginx's, with Connection: keep-alive); it
            # parses 0.9 and 2.0 status lines too, which no HTTP/1.1 upstream sends.
            version: str = self.parser.get_http_version()
            if version != "1.1" and version != "1.0":
                raise _Invalid(f"answered with HTTP/{version}; only HTTP/1.x is relayed")
        self._keep_alive = keep_alive
        bodyless = not self._expect_body or status in (204, 304)
        self._in_body = not bodyless
        self._close_delimited = not bodyless and length is None and not chunked
        exchange.on_response_head(status, self._headers, None if chunked else length, bodyless)
        if not self._expect_body and self.exchange is exchange:
            raise _Stop

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_response_data(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._finish()

    # -- internals ----------------------------------------------------------------------------

    def _finish(self) -> None:
        exchange, self.exchange = self.exchange, None
        self._in_body = False
        self.deadline = self.total_deadline = None
        if exchange is None:
            return
        settings = self.pool.settings
        reusable = (
            not self.closed
            and self._keep_alive
            and not self._close_delimited
            and (not settings.max_requests or self.requests < settings.max_requests)
        )
        self._release = _KEEP if reusable else _DROP  # data_received releases it
        exchange.on_response_end()

    def _too_large(self) -> str:
        return (
            f"sent a response head larger than {self._max_header_bytes} bytes"
            " (max_response_header_bytes)"
        )

    def _invalid(self, what: str) -> None:
        """The upstream's response cannot be relayed: the exchange fails (502 unless the retry
        conditions name invalid_header), the connection closes, and the operator hears of it
        (at most once per WARN_INTERVAL per upstream)."""
        message = f"upstream {self.pool.upstream.address} {what}"
        self.pool.warn(message)
        self._fail(Outcome.INVALID_RESPONSE, message)

    def _fail(self, outcome: Outcome, message: str) -> None:
        exchange, self.exchange = self.exchange, None
        self.close()
        if exchange is not None:
            exchange.on_failure(outcome, message)

    def on_deadline(self, now: float) -> None:
        total = self.total_deadline is not None and now >= self.total_deadline
        what = "total timeout" if total else "read timeout"
        self._fail(Outcome.TIMEOUT, f"upstream {self.pool.upstream.address}: {what}")


class FetchFailed(Exception):
    """A :func:`fetch` got no usable response: ``outcome`` says how (CONNECT_FAILED, RESET,
    TIMEOUT, INVALID_RESPONSE, CANCELLED), the message says why, naming the upstream."""

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class _Collect:
    """The exchange of one :func:`fetch`: the status, and the body whole, refused above
    ``max_body`` bytes; with ``head_only`` the answer is the status alone, given as soon as the
    head is in (the body is not waited for)."""

    def __init__(
        self, done: asyncio.Future[tuple[int, bytes]], max_body: int, head_only: bool
    ) -> None:
        self.done = done
        self.max_body = max_body
        self.head_only = head_only
        self.status = 0
        self.body: list[bytes] = []
        self.size = 0

    def on_response_head(
        self, status: int, headers: Headers, content_length: int | None, bodyless: bool
    ) -> None:
        self.status = status
        if self.head_only:
            self._resolve()
        elif content_length is not None and content_length > self.max_body:
            raise _Invalid(self._too_large())

    def on_response_data(self, data: bytes) -> None:
        if self.head_only:
            return
        self.size += len(data)
        if self.size > self.max_body:
            raise _Invalid(self._too_large())
        self.body.append(data)

    def on_response_end(self) -> None:
        self._resolve()

    def on_failure(self, outcome: Outcome, message: str) -> None:
        if not self.done.done():
            self.done.set_exception(FetchFailed(outcome, message))

    def on_upstream_paused(self) -> None:
        pass

    def on_upstream_resumed(self) -> None:
        pass

    def _resolve(self) -> None:
        if not self.done.done():
            self.done.set_result((self.status, b"".join(self.body)))

    def _too_large(self) -> str:
        return f"sent a response body larger than {self.max_body} bytes"


async def fetch(
    pool: ConnectionPool,
    target: str,
    headers: bytes = b"",
    *,
    within: float,
    max_body: int,
    head_only: bool = False,
) -> tuple[int, bytes]:
    """``GET target`` on a connection of ``pool``, within ``within`` seconds in all (connect
    included): the status and the body (``b""`` with ``head_only``). ``headers``: extra header
    lines, each ending in CRLF. Interim 1xx heads are skipped, as for proxied requests; the
    pool's head limits apply, and its idle connection is reused when both sides keep it alive
    (``keepalive = 0``: a fresh connection each time). FetchFailed for anything but a response.

    Not for the request path: it is a coroutine and a future per call, which the proxy's
    forwarding avoids. Probes and health checks are a few per second.
    """
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise ValueError(f"not a request target: {target!r}")
    address = pool.upstream.address
    request = b"GET %s HTTP/1.1\r\nhost: %s\r\n%s\r\n" % (
        target.encode(),
        address.encode(),
        headers,
    )
    try:
        async with asyncio.timeout(within):
            for _ in range(2):
                conn = await _connection(pool)
                try:
                    return await _exchange(conn, request, max_body, head_only)
                except FetchFailed as exc:
                    if not (
                        exc.outcome is Outcome.RESET and conn.requests > 1 and not conn.received_any
                    ):
                        raise
                    # A kept-alive connection the upstream had closed just as it was reused (a
                    # race of idle timeouts), before any answer: once more, on a fresh one.
            raise FetchFailed(Outcome.RESET, f"upstream {address}: closed the connection")
    except TimeoutError:
        message = f"upstream {address}: no answer within {within}s"
        raise FetchFailed(Outcome.TIMEOUT, message) from None


async def _connection(pool: ConnectionPool) -> UpstreamConnection:
    """A connection of ``pool``: an idle one, or a new one once connected."""
    got: asyncio.Future[UpstreamConnection] = pool.loop.create_future()

    def waiter(conn: UpstreamConnection | None, outcome: Outcome, message: str) -> None:
        if got.done():  # the fetch gave up meanwhile (its deadline, a close): nobody takes it
            if conn is not None:
                conn.close()
        elif conn is None:
            got.set_exception(FetchFailed(outcome, message))
        else:
            got.set_result(conn)

    conn = pool.acquire(waiter)
    if conn is not None:
        return conn
    try:
        return await got
    except asyncio.CancelledError:
        pool.cancel_wait(waiter)
        raise


async def _exchange(
    conn: UpstreamConnection, request: bytes, max_body: int, head_only: bool
) -> tuple[int, bytes]:
    done: asyncio.Future[tuple[int, bytes]] = conn.pool.loop.create_future()
    exchange = _Collect(done, max_body, head_only)
    conn.send(exchange, request, True)
    try:
        result = await done
    except asyncio.CancelledError:
        if conn.exchange is exchange:
            conn.abandon()  # half a response on it: never reused
        raise
    if conn.exchange is exchange:
        conn.abandon()  # head_only: the body is not read, so the connection cannot be reused
    return result


def _reason(exc: BaseException | None) -> str:
    """Why a connection or parse failed, in words: never a bare repr such as httptools' byte
    offsets or an errno tuple."""
    if exc is None:
        return "closed the connection"
    if isinstance(exc, OSError):
        return (exc.strerror or type(exc).__name__).lower()
    text = str(exc).strip()
    if not text or text.isdigit():
        return type(exc).__name__
    return text


class Flusher:
    """Writes the requests queued on a pool's connections once per event loop iteration.

    uvloop writes to the socket inside ``transport.write``. Each request written to an upstream
    that sleeps in epoll wakes it, and on these machines a wake-up across cores costs more than
    the write itself. Holding the writes of one iteration (the requests of every client read in
    it) and writing them together, right after that iteration's I/O callbacks, wakes the upstream
    once for all of them: measured with benchmarks/proxy.py at 32 connections, the proxy's
    kernel time per request fell from 17-19 us to 13-14 us. What it costs: a request waits for
    the rest of its iteration's callbacks (microseconds) before it leaves.
    """

    __slots__ = ("_conns", "_scheduled", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._conns: list[UpstreamConnection] = []
        self._scheduled = False

    def add(self, conn: UpstreamConnection) -> None:
        self._conns.append(conn)
        if not self._scheduled:
            self._scheduled = True
            # call_soon: run at the start of the next iteration, before it polls again.
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.flush()
            except Exception:  # one broken transport must not hold up the others' requests
                log.exception("writing to upstream %s failed", conn.pool.upstream.address)
                conn.close()


# Idle connections above ``keepalive`` are closed once they have been idle this long.
TRIM_AFTER: Final = 1.0

# What waits for a connection: called with one, or with None and why not.
Waiter = Callable[["UpstreamConnection | None", Outcome, str], None]


class ConnectionPool:
    """Connections to one upstream: idle ones reused newest first (so a quiet period lets the
    others reach their idle timeout), new ones opened up to ``max_connections``, then waiters
    queue until a connection is released or ``connect_timeout`` passes.

    ``keepalive`` bounds the idle connections kept for long: a surplus left by a burst is closed
    after TRIM_AFTER seconds idle, so the open connections never exceed the peak concurrency
    (or ``max_connections``) and settle at ``keepalive`` when the load does.
    """

    def __init__(
        self, upstream: Upstream, settings: PoolSettings, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.upstream = upstream
        self.settings = settings
        self.loop = loop
        self.idle: list[UpstreamConnection] = []
        self.busy: set[UpstreamConnection] = set()
        self.connecting: set[asyncio.Task[None]] = set()
        self.waiters: deque[tuple[float, Waiter]] = deque()
        self.closed = False
        self.opened = 0  # connections opened in this pool's life (metrics, tests)
        # Bound once: compiled code calls a method of a non-native object by name, looking it
        # up each time; these run several times per proxied request.
        self.time: Callable[[], float] = loop.time
        self.flusher = Flusher(loop)
        self._warn_after = 0.0  # see warn()
        self._unwarned = 0

    def warn(self, message: str) -> None:
        """Log an upstream's problem, at most once per WARN_INTERVAL (counting the rest)."""
        now = self.time()
        if now < self._warn_after:
            self._unwarned += 1
            return
        self._warn_after = now + WARN_INTERVAL
        unwarned, self._unwarned = self._unwarned, 0
        if unwarned:
            log.warning("%s (and %d more problems not logged)", message, unwarned)
        else:
            log.warning("%s", message)

    @property
    def open_count(self) -> int:
        return len(self.idle) + len(self.busy) + len(self.connecting)

    def acquire(self, waiter: Waiter) -> UpstreamConnection | None:
        """A connection now, or None and ``waiter`` is called later (connected or failed)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self.busy.add(conn)
                return conn
        limit = self.settings.max_connections
        if limit and self.open_count >= limit:
            self.waiters.append((self.loop.time() + self.settings.connect_timeout, waiter))
            return None
        self._connect(waiter)
        return None

    def cancel_wait(self, waiter: Waiter) -> None:
        for i, (_, w) in enumerate(self.waiters):
            if w == waiter:  # ==: a bound method is a new object at every access
                del self.waiters[i]
                return

    def _connect(self, waiter: Waiter) -> None:
        task = self.loop.create_task(self._open(waiter))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def _open(self, waiter: Waiter) -> None:
        upstream = self.upstream
        conn = UpstreamConnection(self)
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                # A native class (compiled) cannot subclass asyncio.Protocol: the loop only
                # calls the connection's methods.
                protocol = cast(asyncio.Protocol, conn)
                await self.loop.create_connection(lambda: protocol, upstream.host, upstream.port)
        except TimeoutError:
            waiter(None, Outcome.CONNECT_FAILED, f"upstream {upstream.address}: connect timeout")
            return
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            waiter(None, Outcome.CONNECT_FAILED, f"upstream {upstream.address}: {reason.lower()}")
            return
        self.opened += 1
        if self.closed:
            conn.close()
            waiter(None, Outcome.CONNECT_FAILED, f"upstream {upstream.address}: pool closed")
            return
        self.busy.add(conn)
        waiter(conn, Outcome.OK, "")

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """An exchange ended cleanly on ``conn``: reuse it, park it or close it."""
        self.busy.discard(conn)
        if not reusable or self.closed or conn.closed:
            conn.close()
            self._serve_waiter()
            return
        if self.waiters:
            _, waiter = self.waiters.popleft()
            self.busy.add(conn)
            waiter(conn, Outcome.OK, "")
            return
        if not self.settings.keepalive:
            conn.close()
            return
        # Parked even above ``keepalive``: the sweep trims the surplus once it has stayed idle
        # for TRIM_AFTER. nginx closes it at once, which under bursty load means closing
        # connections that the next burst has to open again.
        conn.idle_since = self.time()
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """``conn`` closed (either side): it leaves the pool, making room for a waiter."""
        self.busy.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        self._serve_waiter()

    def _serve_waiter(self) -> None:
        limit = self.settings.max_connections
        if self.waiters and not self.closed and (not limit or self.open_count < limit):
            _, waiter = self.waiters.popleft()
            self._connect(waiter)

    def sweep(self, now: float) -> None:
        """Expire deadlines: exchanges past their read or total timeout, idle connections past
        the idle timeout, waiters past the connect timeout."""
        for conn in list(self.busy):
            deadline = conn.deadline
            total = conn.total_deadline
            if (deadline is not None and now >= deadline) or (total is not None and now >= total):
                conn.on_deadline(now)
        idle = self.idle
        idle_timeout = self.settings.idle_timeout
        if idle and now - idle[0].idle_since >= idle_timeout:
            for conn in [c for c in idle if now - c.idle_since >= idle_timeout]:
                idle.remove(conn)
                conn.close()
        # Beyond ``keepalive``, the connections idle longest go (the list is oldest first).
        while len(idle) > self.settings.keepalive and now - idle[0].idle_since >= TRIM_AFTER:
            idle.pop(0).close()
        while self.waiters and now >= self.waiters[0][0]:
            _, waiter = self.waiters.popleft()
            waiter(None, Outcome.CANCELLED, f"upstream {self.upstream.address}: no connection free")

    def close(self) -> None:
        """Close idle connections now and busy ones as their exchanges end (a reload)."""
        self.closed = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()
        while self.waiters:
            _, waiter = self.waiters.popleft()
            waiter(None, Outcome.CANCELLED, f"upstream {self.upstream.address}: pool closed")

    def abort(self) -> None:
        """Close everything now (shutdown after the drain)."""
        self.close()
        for conn in list(self.busy):
            conn.close()
        for task in list(self.connecting):
            task.cancel()
