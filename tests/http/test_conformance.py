"""HTTP/1.1 conformance of a real listening server, driven with raw sockets and parsed with h11.

Every wait is a socket read with a timeout: the tests wait on what the server sends, not on sleep.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from typing import Any

import h11
import orjson
import pytest

from tests.conftest import XOR, Running, serve_in_thread, xor_config
from tests.http.test_protocol import Resp, req
from webtorch import config as wt_config

TIMEOUT = 5.0  # bound of every socket wait; far above what any answer needs

# Small limits so that the refusals are cheap to provoke.
LIMITS: dict[str, Any] = {
    "max_url": 1024,
    "max_header_bytes": 4096,
    "max_headers": 20,
    "max_body": 4096,
}
BIG = 4096  # body of GET /big


@pytest.fixture(scope="module")
def main_server() -> Iterator[Running]:
    cfg = wt_config.from_dict(
        {
            "models": {"xor": {"path": str(XOR)}},
            "server": {"limits": LIMITS},
            "routes": [{"path": "/big", "return": 200, "body": "x" * BIG}],
        }
    )
    with serve_in_thread(cfg) as running:
        yield running


@pytest.fixture
def server(main_server: Running) -> Iterator[Running]:
    """The shared server; after each test it must still answer a new client."""
    yield main_server
    assert_serving(main_server)


@pytest.fixture(scope="module")
def impatient() -> Iterator[Running]:
    """A server with half-second timeouts (its clock sweeps deadlines once a second)."""
    with serve_in_thread(
        xor_config(header_timeout=0.5, body_timeout=0.5, keepalive_timeout=0.5)
    ) as running:
        yield running


# -- client helpers ---------------------------------------------------------------------------


def continued(sock: socket.socket, body: bytes) -> Resp:
    """Wait for the 100 Continue (before sending the body), send ``body``, read the answer."""
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1024)
        assert chunk, "closed before 100 Continue"
        interim += chunk
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.sendall(body)
    reader = Reader(sock)
    reader.conn.receive_data(interim)
    [resp] = reader.read(1)
    assert resp.informational == [100]
    return resp


@contextmanager
def connect(running: Running, timeout: float = TIMEOUT) -> Iterator[socket.socket]:
    with closing(socket.create_connection((running.host, running.port), timeout)) as sock:
        sock.settimeout(timeout)
        yield sock


class Reader:
    """Reads responses from a socket with an h11 client, which checks their framing."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = h11.Connection(h11.CLIENT)
        self.closed = False

    def read(self, count: int, methods: Sequence[str] = ()) -> list[Resp]:
        """Up to ``count`` responses; fewer if the server closes first."""
        out: list[Resp] = []
        while len(out) < count and not self.closed:
            method = methods[len(out)] if len(out) < len(methods) else "GET"
            resp = self._one(method)
            if resp is None:
                break
            out.append(resp)
        return out

    def _one(self, method: str) -> Resp | None:
        conn = self.conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        conn.send(h11.Request(method=method, target="/", headers=[("host", "test")]))
        conn.send(h11.EndOfMessage())
        info: list[int] = []
        head: h11.Response | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(self._recv())
            elif isinstance(event, h11.ConnectionClosed):
                self.closed = True
                return None
            elif isinstance(event, h11.InformationalResponse):
                info.append(event.status_code)
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                if conn.their_state is h11.MUST_CLOSE:
                    self.closed = self._at_eof()
                return Resp(head.status_code, dict(head.headers), bytes(body), info)

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""

    def _at_eof(self) -> bool:
        rest, closed = self.conn.trailing_data
        assert rest == b"", f"bytes after a closing response: {rest[:80]!r}"
        return closed or self._recv() == b""


def wait_closed(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Everything the server still sends until it closes; fails if it does not within timeout."""
    sock.settimeout(timeout)
    data = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk
    raise AssertionError(f"server did not close the connection; got {bytes(data)[:200]!r}")


def exchange(running: Running, data: bytes, count: int = 1, *methods: str) -> list[Resp]:
    with connect(running) as sock:
        sock.sendall(data)
        return Reader(sock).read(count, methods)


def assert_serving(running: Running) -> None:
    [resp] = exchange(running, req("GET", "/v2/health/live"))
    assert resp.status == 200
    assert resp.json() == {"live": True}


def predict(*rows: list[int], headers: Sequence[tuple[str, str]] = ()) -> bytes:
    body = orjson.dumps({"inputs": list(rows)})
    return req(
        "POST", "/models/xor/predict", [("Content-Type", "application/json"), *headers], body
    )


def server_connections(running: Running) -> list[dict[str, Any]]:
    """The server's view of its connections, taken on its own loop."""

    async def look() -> list[dict[str, Any]]:
        assert running.app.server is not None
        return [
            {
                "read_paused": conn.read_paused,
                "write_paused": conn.write_paused,
                "slots": len(conn.slots),
                "buffered": conn.transport.get_write_buffer_size() if conn.transport else 0,
            }
            for conn in running.app.server.state.connections
        ]

    return asyncio.run_coroutine_threadsafe(look(), running.loop).result(TIMEOUT)


# -- the protocol -----------------------------------------------------------------------------


def test_pipelined_requests_answered_in_order(server: Running) -> None:
    data = (
        req("GET", "/v2/health/live")
        + req("GET", "/models/xor")
        + predict([0, 1])
        + req("GET", "/no/such/route")
        + predict([1, 1])
        + req("GET", "/v2/health/ready")
    )
    responses = exchange(server, data, 6)
    assert [r.status for r in responses] == [200, 200, 200, 404, 200, 200]
    assert responses[0].json() == {"live": True}
    assert responses[1].json()["name"] == "xor"
    assert responses[2].json()["outputs"][0][0] > 0.9
    assert "error" in responses[3].json()
    assert responses[4].json()["outputs"][0][0] < 0.1
    assert responses[5].json() == {"ready": True}


def test_pipelined_predictions_keep_their_order(server: Running) -> None:
    rows = [[i % 2, (i // 2) % 2] for i in range(40)]
    responses = exchange(server, b"".join(predict(row) for row in rows), len(rows))
    assert len(responses) == len(rows)
    for row, resp in zip(rows, responses, strict=True):
        assert resp.status == 200
        assert (resp.json()["outputs"][0][0] > 0.5) == (row[0] != row[1])


def test_half_closed_client_gets_every_answer_then_close(server: Running) -> None:
    rows = [[0, 1], [1, 1], [1, 0]]
    with connect(server) as sock:
        sock.sendall(b"".join(predict(row) for row in rows))
        sock.shutdown(socket.SHUT_WR)  # "that is all I am sending", as nc -N does
        data = wait_closed(sock)
    assert data.count(b"HTTP/1.1 200 OK") == len(rows)
    assert_serving(server)


def test_keep_alive_across_sends(server: Running) -> None:
    with connect(server) as sock:
        reader = Reader(sock)
        for row in ([0, 0], [1, 0], [0, 1]):
            sock.sendall(predict(row))
            [resp] = reader.read(1)
            assert resp.status == 200
        assert not reader.closed


def test_chunked_upload(server: Running) -> None:
    body = orjson.dumps({"inputs": [[1, 0], [0, 0]]})
    with connect(server) as sock:
        sock.sendall(
            req(
                "POST",
                "/models/xor/predict",
                [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
            )
        )
        for i in range(0, len(body), 7):
            piece = body[i : i + 7]
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"0\r\n\r\n")
        [resp] = Reader(sock).read(1)
    assert resp.status == 200
    outputs = resp.json()["outputs"]
    assert outputs[0][0] > 0.9
    assert outputs[1][0] < 0.1


def test_expect_100_continue(server: Running) -> None:
    body = orjson.dumps({"inputs": [[0, 1]]})
    head = req(
        "POST",
        "/models/xor/predict",
        [
            ("Content-Type", "application/json"),
            ("Expect", "100-continue"),
            ("Content-Length", str(len(body))),
        ],
    )
    with connect(server) as sock:
        sock.sendall(head)
        resp = continued(sock, body)
    assert resp.status == 200


def test_expect_100_continue_refused_when_too_large(server: Running) -> None:
    head = req(
        "POST", "/models/xor/predict", [("Expect", "100-continue"), ("Content-Length", "5000")]
    )
    with connect(server) as sock:
        sock.sendall(head)
        [resp] = Reader(sock).read(1)
        assert resp.status == 413
        assert resp.informational == []
        wait_closed(sock)


def test_head(server: Running) -> None:
    with connect(server) as sock:
        sock.sendall(req("HEAD", "/models/xor") + req("GET", "/models/xor"))
        head, get = Reader(sock).read(2, ["HEAD", "GET"])
    assert head.status == 200
    assert head.body == b""
    assert int(head.headers[b"content-length"]) == len(get.body) > 0


def test_http10_closes(server: Running) -> None:
    with connect(server) as sock:
        sock.sendall(req("GET", "/v2/health/live", version="1.0"))
        data = wait_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nconnection: close\r\n" in data.lower()
    assert data.endswith(b'{"live":true}')


def test_http10_keep_alive(server: Running) -> None:
    with connect(server) as sock:
        reader = Reader(sock)
        for _ in range(2):
            sock.sendall(
                req("GET", "/v2/health/live", [("Connection", "keep-alive")], version="1.0")
            )
            [resp] = reader.read(1)
            assert resp.headers[b"connection"] == b"keep-alive"


def test_connection_close(server: Running) -> None:
    with connect(server) as sock:
        sock.sendall(req("GET", "/v2/health/live", [("Connection", "close")]) + req("GET", "/"))
        reader = Reader(sock)
        [resp] = reader.read(2)
        assert resp.headers[b"connection"] == b"close"
        assert reader.closed


# -- refusals ---------------------------------------------------------------------------------


REFUSALS = {
    "header-too-large": (req("GET", "/v2/health/live", [("X-Big", "a" * 5000)]), 431),
    "too-many-headers": (req("GET", "/", [(f"X-{i}", "v") for i in range(25)]), 431),
    "body-too-large": (predict(*[[0, 1]] * 1000), 413),
    "body-too-large-chunked": (
        req("POST", "/models/xor/predict", [("Transfer-Encoding", "chunked")])
        + (b"400\r\n" + b"x" * 1024 + b"\r\n") * 5,
        413,
    ),
    "url-too-long": (req("GET", "/" + "a" * 2000), 414),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, 400),
    "bad-version": (b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 400),
    "cl-and-te": (
        req(
            "POST",
            "/models/xor/predict",
            [("Content-Length", "4"), ("Transfer-Encoding", "chunked")],
        )
        + b"0\r\n\r\n",
        400,
    ),
    "te-and-cl": (
        req(
            "POST",
            "/models/xor/predict",
            [("Transfer-Encoding", "chunked"), ("Content-Length", "4")],
        )
        + b"0\r\n\r\n",
        400,
    ),
    "duplicate-cl": (
        req("POST", "/models/xor/predict", [("Content-Length", "0"), ("Content-Length", "5")])
        + b"hello",
        400,
    ),
    "cl-list": (req("POST", "/models/xor/predict", [("Content-Length", "5, 5")]) + b"hello", 400),
    "te-not-chunked": (req("POST", "/models/xor/predict", [("Transfer-Encoding", "gzip")]), 400),
    "te-obfuscated": (
        req("POST", "/models/xor/predict", [("Transfer-Encoding", " chunked\x0b")]) + b"0\r\n\r\n",
        400,
    ),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    "space-before-colon": (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello", 400),
    "bad-chunk-size": (
        req("POST", "/models/xor/predict", [("Transfer-Encoding", "chunked")]) + b"zz\r\nhello\r\n",
        400,
    ),
    "chunk-size-overflow": (
        req("POST", "/models/xor/predict", [("Transfer-Encoding", "chunked")])
        + b"1" * 40
        + b"\r\nx\r\n",
        400,
    ),
    "chunk-without-crlf": (
        req("POST", "/models/xor/predict", [("Transfer-Encoding", "chunked")])
        + b"5\r\nhelloXX0\r\n\r\n",
        400,
    ),
    "bare-lf": (b"GET / HTTP/1.1\nHost: x\n\n", 400),
    "nul-in-header": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusal_then_close(server: Running, name: str) -> None:
    data, status = REFUSALS[name]
    smuggled = req("GET", "/smuggled")
    with connect(server) as sock:
        sock.sendall(data + smuggled)
        reader = Reader(sock)
        responses = reader.read(2)
        assert [r.status for r in responses] == [status]
        assert responses[0].headers[b"connection"] == b"close"
        assert "error" in responses[0].json()
        assert reader.closed


def test_413_by_content_length_is_answered_before_the_body(server: Running) -> None:
    with connect(server) as sock:
        sock.sendall(req("POST", "/models/xor/predict", [("Content-Length", str(10**9))]))
        [resp] = Reader(sock).read(1)
        assert resp.status == 413


def test_413_survives_an_unread_upload(server: Running) -> None:
    """The client sends its whole (too large) body before reading: the lingering close drains it,
    so the 413 is not destroyed by a reset."""
    body = b"x" * 200_000
    with connect(server) as sock:
        sock.sendall(req("POST", "/models/xor/predict", [("Content-Length", str(len(body)))]))
        sock.sendall(body)
        data = wait_closed(sock)
    assert data.startswith(b"HTTP/1.1 413 ")


def test_a_half_received_request_does_not_block_other_clients(server: Running) -> None:
    with connect(server) as stuck:
        stuck.sendall(
            b"POST /models/xor/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
        )
        with connect(server) as other:
            other.sendall(predict([1, 0]))
            [resp] = Reader(other).read(1)
            assert resp.status == 200


# -- timeouts ---------------------------------------------------------------------------------


def test_slowloris_is_cut_off(impatient: Running) -> None:
    """A client sending its header one byte at a time, slower than header_timeout allows, gets
    408 (or a close) within about header_timeout plus the clock's one-second sweep."""
    header = req("GET", "/v2/health/live", [("X-Slow", "y" * 200)])
    with connect(impatient) as sock:
        sock.settimeout(0.1)  # the pace: one byte per 0.1 s, unless the server speaks first
        start = time.monotonic()
        answer = b""
        for byte in header:
            sock.sendall(bytes([byte]))
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            break
        elapsed = time.monotonic() - start
        answer += wait_closed(sock)
    assert elapsed < 4.0, "the server waited for the whole slow header"
    if answer:
        assert answer.startswith(b"HTTP/1.1 408 ")
    assert_serving(impatient)


def test_slow_body_is_cut_off(impatient: Running) -> None:
    with connect(impatient) as sock:
        sock.sendall(req("POST", "/models/xor/predict", [("Content-Length", "100")]) + b"{")
        start = time.monotonic()
        data = wait_closed(sock)
    assert time.monotonic() - start < 4.0
    assert data.startswith(b"HTTP/1.1 408 ")


def test_idle_keep_alive_connection_is_closed(impatient: Running) -> None:
    with connect(impatient) as sock:
        sock.sendall(req("GET", "/v2/health/live"))
        reader = Reader(sock)
        [resp] = reader.read(1)
        assert resp.status == 200
        start = time.monotonic()
        assert wait_closed(sock) == b""  # closed without a word
    assert time.monotonic() - start < 4.0


def test_silent_client_is_closed(impatient: Running) -> None:
    with connect(impatient) as sock:
        start = time.monotonic()
        assert wait_closed(sock) == b""
    assert time.monotonic() - start < 4.0


# -- backpressure -----------------------------------------------------------------------------


def test_client_that_does_not_read_is_not_buffered_without_bound(server: Running) -> None:
    """Pipeline requests for 4 KiB responses without reading any: the server must stop reading
    (TCP flow control then stops the client) instead of buffering responses without bound. Once
    the client reads, every response arrives, intact and in order."""
    one = req("GET", "/big", [("X-Pad", "p" * 2000)])
    batch = one * 16
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.connect((server.host, server.port))
        # Send until the send buffer stays full and the server says it stopped reading.
        sock.settimeout(0.5)
        sent = 0
        paused: list[dict[str, Any]] = []
        while not paused and sent < 64 * 1024 * 1024:
            try:
                sent += sock.send(memoryview(batch)[sent % len(batch) :])
            except TimeoutError:
                paused = [c for c in server_connections(server) if c["read_paused"]]
        assert paused, "the server kept reading 64 MiB of requests nobody reads the answers to"
        [view] = paused
        assert view["write_paused"]
        # What the server holds is bounded by one read's worth of requests, not by what was sent.
        assert view["buffered"] < 4 * 1024 * 1024
        assert view["slots"] <= 64

        # Complete the request cut in the middle, from a thread: the send blocks until we read.
        requests, cut = divmod(sent, len(one))
        tail = one[cut:] if cut else b""
        sock.settimeout(TIMEOUT)
        sender = threading.Thread(target=sock.sendall, args=(tail,))
        sender.start()
        expected = requests + (1 if cut else 0)
        data = bytearray()
        first_len = 0
        while True:
            chunk = sock.recv(1 << 20)
            assert chunk, "server closed early"
            data += chunk
            if not first_len and b"\r\n\r\n" in data:
                first_len = data.index(b"\r\n\r\n") + 4 + BIG
            if first_len and len(data) >= expected * first_len:
                break
        sender.join(TIMEOUT)
    assert len(data) == expected * first_len
    assert data.count(b"HTTP/1.1 200 OK\r\n") == expected
