"""The upstream connection and its pool, fed bytes and a fake clock (no sockets)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from webtorch.balance.base import Outcome, Upstream
from webtorch.http.client.connection import UpstreamConnection
from webtorch.http.client.pool import TRIM_AFTER, ConnectionPool
from webtorch.http.client.settings import PoolSettings
from webtorch.http.messages import Headers


class FakeLoop:
    def __init__(self) -> None:
        self.now = 100.0
        self.soon: list[Callable[[], None]] = []

    def time(self) -> float:
        return self.now

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def run_soon(self) -> None:
        """One loop turn: the callbacks scheduled so far (the pool's write flush)."""
        soon, self.soon = self.soon, []
        for callback in soon:
            callback()


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Recorder:
    """An Exchange (structurally: a compiled Protocol cannot be subclassed from here)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_response_head(
        self, status: int, headers: Headers, content_length: int | None, bodyless: bool
    ) -> None:
        self.events.append(("head", status, content_length, bodyless))

    def on_response_data(self, data: bytes) -> None:
        self.events.append(("data", data))

    def on_response_end(self) -> None:
        self.events.append(("end",))

    def on_failure(self, outcome: Outcome, message: str) -> None:
        self.events.append(("failure", outcome))

    def on_upstream_paused(self) -> None: ...
    def on_upstream_resumed(self) -> None: ...


def make_pool(**settings: Any) -> tuple[ConnectionPool, FakeLoop]:
    loop = FakeLoop()
    upstream = Upstream("127.0.0.1:9", "127.0.0.1", 9)
    return ConnectionPool(upstream, PoolSettings(**settings), loop), loop  # type: ignore[arg-type]


def connected(pool: ConnectionPool) -> tuple[UpstreamConnection, FakeTransport]:
    conn = UpstreamConnection(pool)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    pool.busy.add(conn)
    return conn, transport


def exchange(conn: UpstreamConnection, response: bytes, expect_body: bool = True) -> Recorder:
    rec = Recorder()
    conn.send(rec, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", expect_body)
    conn.pool.loop.run_soon()  # type: ignore[attr-defined]
    conn.data_received(response)
    return rec


def test_requests_queued_in_one_loop_turn_are_written_together_in_order() -> None:
    """Writes wait for the pool's flush at the next loop turn (one wake-up of the upstream for
    all of them); a connection keeps its own order, and one closed meanwhile writes nothing."""
    pool, loop = make_pool()
    (a, ta), (b, tb), (c, tc) = connected(pool), connected(pool), connected(pool)
    a.send(Recorder(), b"head-a", True)
    a.write(b"body-a")
    b.send(Recorder(), b"head-b", True)
    c.send(Recorder(), b"head-c", True)
    c.abandon()
    assert ta.written == tb.written == tc.written == []
    assert len(loop.soon) == 1  # one flush for the turn, whatever the number of writes
    loop.run_soon()
    assert ta.written == [b"head-abody-a"]
    assert tb.written == [b"head-b"]
    assert tc.written == [] and tc.closed


def test_closing_writes_what_was_queued_first() -> None:
    pool, _ = make_pool()
    conn, transport = connected(pool)
    conn.send(Recorder(), b"request", True)
    conn.close()
    assert transport.written == [b"request"] and transport.closed


def test_a_response_is_delivered_and_the_connection_pooled() -> None:
    pool, _ = make_pool()
    conn, _ = connected(pool)
    rec = exchange(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert rec.events == [("head", 200, 2, False), ("data", b"ok"), ("end",)]
    assert pool.idle == [conn]


def test_interim_responses_are_skipped() -> None:
    pool, _ = make_pool()
    conn, _ = connected(pool)
    rec = exchange(
        conn, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    )
    assert rec.events == [("head", 201, 0, False), ("end",)]


def test_head_response_ends_at_its_headers_and_the_connection_stays_usable() -> None:
    pool, _ = make_pool()
    conn, _ = connected(pool)
    rec = exchange(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", expect_body=False)
    assert rec.events == [("head", 200, 1000, True), ("end",)]
    assert pool.idle == [conn]
    conn = pool.acquire(lambda *a: None)  # type: ignore[assignment]
    rec = exchange(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert rec.events[-1] == ("end",)


def test_close_delimited_body_ends_at_eof_and_is_not_reused() -> None:
    pool, _ = make_pool()
    conn, _ = connected(pool)
    rec = exchange(conn, b"HTTP/1.1 200 OK\r\n\r\nsome")
    conn.data_received(b" more")
    conn.connection_lost(None)
    assert rec.events == [
        ("head", 200, None, False),
        ("data", b"some"),
        ("data", b" more"),
        ("end",),
    ]
    assert pool.idle == []


def test_connection_close_from_the_upstream_is_honoured() -> None:
    pool, _ = make_pool()
    conn, transport = connected(pool)
    exchange(conn, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert pool.idle == [] and transport.closed


def test_a_broken_response_is_an_invalid_response() -> None:
    pool, _ = make_pool()
    conn, transport = connected(pool)
    rec = exchange(conn, b"HTTP/1.1 2x0 OK\r\n\r\n")
    assert rec.events == [("failure", Outcome.INVALID_RESPONSE)]
    assert transport.closed


def test_read_timeout_is_swept() -> None:
    pool, loop = make_pool(read_timeout=5.0)
    conn, transport = connected(pool)
    rec = Recorder()
    conn.send(rec, b"GET / HTTP/1.1\r\n\r\n", True)
    loop.now += 4.9
    pool.sweep(loop.now)
    assert rec.events == []
    loop.now += 0.2
    pool.sweep(loop.now)
    assert rec.events == [("failure", Outcome.TIMEOUT)] and transport.closed


def test_max_requests_per_connection() -> None:
    pool, _ = make_pool(max_requests_per_connection=2)
    conn, transport = connected(pool)
    exchange(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert pool.idle == [conn]
    pool.idle.clear()
    exchange(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert pool.idle == [] and transport.closed


def test_idle_surplus_above_keepalive_is_trimmed_after_a_while() -> None:
    pool, loop = make_pool(keepalive=2, idle_timeout=60.0)
    conns = [connected(pool) for _ in range(5)]
    for conn, _ in conns:
        pool.release(conn, True)
    assert len(pool.idle) == 5  # a burst's connections stay for the next burst...
    loop.now += TRIM_AFTER / 2
    pool.sweep(loop.now)
    assert len(pool.idle) == 5
    loop.now += TRIM_AFTER
    pool.sweep(loop.now)
    assert pool.idle == [conns[3][0], conns[4][0]]  # ...then the oldest surplus goes
    assert [t.closed for _, t in conns] == [True, True, True, False, False]
    loop.now += 60.0
    pool.sweep(loop.now)
    assert pool.idle == []  # idle timeout


def test_waiters_queue_at_max_connections_and_get_released_connections() -> None:
    pool, loop = make_pool(max_connections=1, connect_timeout=1.0)
    conn, _ = connected(pool)
    got: list[Any] = []
    assert pool.acquire(lambda c, o, m: got.append((c, o))) is None
    pool.release(conn, True)
    assert got == [(conn, Outcome.OK)]
    # A second waiter gives up after connect_timeout.
    pool.acquire(lambda c, o, m: got.append((c, o)))
    loop.now += 1.5
    pool.sweep(loop.now)
    assert got[-1] == (None, Outcome.CANCELLED)


def test_an_oversized_head_fails_the_exchange_before_it_is_buffered_whole() -> None:
    pool, _ = make_pool(max_response_header_bytes=1024)
    conn, transport = connected(pool)
    rec = exchange(conn, b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 600)
    assert rec.events == []  # still under the limit: the head may yet end
    conn.data_received(b"a" * 600)
    assert rec.events == [("failure", Outcome.INVALID_RESPONSE)] and transport.closed


def test_upstream_problems_are_logged_once_per_interval(caplog: Any) -> None:
    from webtorch.http.client.pool import WARN_INTERVAL

    pool, loop = make_pool()
    for _ in range(3):
        pool.warn("upstream 127.0.0.1:9 misbehaved")
    loop.now += WARN_INTERVAL
    pool.warn("upstream 127.0.0.1:9 misbehaved again")
    assert [r.getMessage() for r in caplog.records] == [
        "upstream 127.0.0.1:9 misbehaved",
        "upstream 127.0.0.1:9 misbehaved again (and 2 more problems not logged)",
    ]
