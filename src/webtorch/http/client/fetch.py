"""The proxy's own requests: :func:`fetch`, a one-shot GET with a deadline, sent through a
:class:`~webtorch.http.client.pool.ConnectionPool` and its connections' parser, so that load
probes and active health checks are bounded by the limits that bound proxied responses.
"""

from __future__ import annotations

import asyncio

from webtorch.http.client.connection import Invalid, UpstreamConnection
from webtorch.http.client.pool import ConnectionPool
from webtorch.http.messages import Headers
from webtorch.vocab import Outcome


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
            raise Invalid(self._too_large())

    def on_response_data(self, data: bytes) -> None:
        if self.head_only:
            return
        self.size += len(data)
        if self.size > self.max_body:
            raise Invalid(self._too_large())
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
