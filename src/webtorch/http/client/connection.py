"""One connection to an upstream: it writes a request (through its pool's flusher) and parses
the response with httptools, reporting to the request's :class:`Exchange`.

Its limits on what an upstream may send (head size, header count, framing, 101) refuse a
response as :class:`Invalid` (502); its read and total deadlines are floats that the pool's
sweep checks, not timers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, cast

import httptools

from webtorch.http.messages import Headers, lower_name
from webtorch.vocab import Outcome

if TYPE_CHECKING:
    from webtorch.http.client.pool import ConnectionPool

log: Final = logging.getLogger("webtorch.proxy")


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


class Invalid(Exception):
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
        self._max_header_bytes = pool.max_header_bytes
        self._max_headers = pool.max_headers
        self._release = 0  # _KEEP or _DROP: a response ended; the pool gets it after the read

    def _new_parser(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self._feed_data: Callable[[bytes], None] = self.parser.feed_data  # bound, as pool.time

    # -- used by the exchange -----------------------------------------------------------------

    def send(self, exchange: Exchange, data: bytes, expect_body: bool) -> None:
        """Start an exchange: write the request head (and a body already at hand)."""
        pool = self.pool
        now = pool.time()
        self.exchange = exchange
        self.requests += 1
        self.received_any = False
        self._expect_body = expect_body
        self._informational = False
        self._in_head = True
        self._head_raw = 0
        self._header_bytes = 0
        self._http11 = False
        self.deadline = now + pool.read_timeout
        total = pool.total_timeout
        self.total_deadline = now + total if total else None
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
            self.deadline = self.pool.time() + self.pool.read_timeout
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
            exchange.on_failure(Outcome.RESET, f"upstream {address}: {reason(exc)}")

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
            elif isinstance(cause, Invalid):
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
            self._invalid(f"sent an invalid response: {reason(exc)}")
        else:
            if self._in_head:
                if self._head_raw > self._max_header_bytes and self.exchange is not None:
                    self._invalid(self._too_large())
            elif self.deadline is not None and self.exchange is not None:
                # The response goes on: the read deadline counts from this read. (After the
                # parse, so a response complete in this read, most of them, reads no clock.)
                self.deadline = self.pool.time() + self.pool.read_timeout
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
            raise Invalid("sent more than one response to a request")
        self._headers = []
        self._length = None
        self._chunked = False
        self._connection = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = lower_name(name)
        headers = self._headers
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._max_header_bytes:
            raise Invalid(self._too_large())
        if len(headers) >= self._max_headers:
            raise Invalid(
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
                raise Invalid("sent a Transfer-Encoding other than chunked")
            self._chunked = True
        elif name == b"connection":
            self._connection = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 or status > 599:
            if status == 101:
                raise Invalid(
                    "answered 101 Switching Protocols; WebSocket proxying is not supported"
                )
            if status < 100 or status > 599:
                raise Invalid(f"sent an invalid status code {status}")
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
                raise Invalid(f"answered with HTTP/{version}; only HTTP/1.x is relayed")
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
        limit = self.pool.max_requests
        reusable = (
            not self.closed
            and self._keep_alive
            and not self._close_delimited
            and (not limit or self.requests < limit)
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


def reason(exc: BaseException | None) -> str:
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
