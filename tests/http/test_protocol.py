"""HttpProtocol fed bytes through a fake transport: no sockets, a fake clock for the deadlines.

Shaped like uvicorn's tests/protocols/test_http.py. Responses are parsed with h11, an independent
HTTP implementation, so a framing mistake (a wrong content-length, a body after HEAD, bytes after
``connection: close``) fails the parse instead of slipping through a string comparison.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import orjson
import pytest

from webtorch.errors import BadRequest, NotFound, Unauthorized
from webtorch.http.limits import Limits
from webtorch.http.messages import Handler, HandlerResult, Request, Response, json_response
from webtorch.http.protocol import HttpProtocol
from webtorch.http.router import Route
from webtorch.http.state import ServerState

# -- fakes and helpers ------------------------------------------------------------------------


class FakeTransport:
    """Records what the protocol does to its transport. Like asyncio's transports it delivers
    ``connection_lost`` on a later loop iteration; writing after ``write_eof``/``close`` is
    recorded as an error (uvloop raises on the first) and checked at teardown."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, protocol: HttpProtocol, can_eof: bool = True
    ) -> None:
        self.loop = loop
        self.protocol = protocol
        self.data = bytearray()
        self.eof = False
        self.closed = False
        self.reading = True
        self.errors: list[str] = []
        self._can_eof = can_eof

    def write(self, data: bytes) -> None:
        if self.eof or self.closed:
            self.errors.append(f"write after {'eof' if self.eof else 'close'}: {data[:60]!r}")
            return
        self.data += data

    def write_eof(self) -> None:
        if self.eof or self.closed:
            self.errors.append("write_eof after eof or close")
        self.eof = True

    def can_write_eof(self) -> bool:
        return self._can_eof

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        if not self.reading:
            self.errors.append("pause_reading while paused")
        self.reading = False

    def resume_reading(self) -> None:
        if self.reading:
            self.errors.append("resume_reading while reading")
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000)}.get(name, default)

    def get_write_buffer_size(self) -> int:
        return 0


@dataclass
class Resp:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    informational: list[int] = field(default_factory=list)

    def json(self) -> Any:
        return orjson.loads(self.body)


def parse_responses(data: bytes, methods: Sequence[str] = (), eof: bool = False) -> list[Resp]:
    """Every complete response in ``data``, parsed by an h11 client. ``methods`` are those of the
    requests answered (GET when not given): HEAD changes framing. Raises on a malformed response
    and on bytes after a response that closes the connection."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(bytes(data))
    if eof:
        conn.receive_data(b"")
    out: list[Resp] = []
    while conn.trailing_data[0]:
        method = methods[len(out)] if len(out) < len(methods) else "GET"
        conn.send(h11.Request(method=method, target="/", headers=[("host", "test")]))
        conn.send(h11.EndOfMessage())
        info: list[int] = []
        head: h11.Response | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return out
            if isinstance(event, h11.InformationalResponse):
                info.append(event.status_code)
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        assert head is not None
        out.append(Resp(head.status_code, dict(head.headers), bytes(body), info))
        if conn.their_state is not h11.DONE:
            rest, _ = conn.trailing_data
            assert rest == b"", f"bytes after a closing response: {rest[:80]!r}"
            return out
        conn.start_next_cycle()
    return out


def req(
    method: str = "GET",
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    version: str = "1.1",
) -> bytes:
    """A request's bytes: a Host header, the given headers, Content-Length for a body."""
    lines = [f"{method} {target} HTTP/{version}", "Host: test"]
    lines += [f"{name}: {value}" for name, value in headers]
    framed = any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers)
    if body and not framed:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def echo(request: Request) -> Response:
    return json_response(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "body": request.body.decode("latin-1"),
            "version": request.http_version,
            "keep_alive": request.keep_alive,
            "client": request.client,
        }
    )


class Deferred:
    """A handler answering with futures that the test resolves, in any order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: list[tuple[Request, asyncio.Future[Response]]] = []

    def __call__(self, request: Request) -> HandlerResult:
        fut: asyncio.Future[Response] = self.loop.create_future()
        self.calls.append((request, fut))
        return fut

    def answer(self, index: int, response: Response | None = None) -> None:
        request, fut = self.calls[index]
        fut.set_result(response or json_response({"path": request.path}))


def settle(loop: asyncio.AbstractEventLoop) -> None:
    """Run the callbacks already scheduled (future callbacks, connection_lost), and theirs."""
    for _ in range(3):
        loop.call_soon(loop.stop)
        loop.run_forever()


class Conn:
    """One connection: an HttpProtocol on a FakeTransport."""

    def __init__(
        self,
        state: ServerState,
        loop: asyncio.AbstractEventLoop,
        can_eof: bool = True,
        protocol_class: type[HttpProtocol] = HttpProtocol,
    ) -> None:
        self.loop = loop
        self.state = state
        self.protocol = protocol_class(state, loop)
        self.transport = FakeTransport(loop, self.protocol, can_eof)
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def responses(self, *methods: str) -> list[Resp]:
        return parse_responses(self.transport.data, methods, eof=self.finished)

    @property
    def finished(self) -> bool:
        """The server is done sending: a half-close (lingering close) or a close."""
        return self.transport.eof or self.transport.closed


MakeConn = Callable[..., Conn]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def make(loop: asyncio.AbstractEventLoop) -> Iterator[MakeConn]:
    """``make(handler, **limits)``: a Conn on a new ServerState; ``make(state=s)`` shares one."""
    conns: list[Conn] = []

    def factory(
        handler: Handler = echo,
        *,
        state: ServerState | None = None,
        can_eof: bool = True,
        **limits: Any,
    ) -> Conn:
        if state is None:
            state = ServerState(handler, Limits(**limits))
        conn = Conn(state, loop, can_eof)
        conns.append(conn)
        return conn

    yield factory
    for conn in conns:
        assert conn.transport.errors == []


def deadline_passed(conn: Conn, seconds: float) -> None:
    """Move the fake clock ``seconds`` past now and let the server sweep its deadlines."""
    conn.state.tick(conn.loop.time() + seconds)
    settle(conn.loop)


# -- basics -----------------------------------------------------------------------------------


def test_simple_get(make: MakeConn) -> None:
    conn = make()
    conn.send(req("GET", "/a/b?x=1&y=2"))
    assert conn.transport.data.startswith(b"HTTP/1.1 200 OK\r\n")
    [resp] = conn.responses()
    assert resp.status == 200
    assert resp.headers[b"content-type"] == b"application/json"
    assert resp.headers[b"server"] == b"webtorch"
    assert b"date" in resp.headers
    assert b"connection" not in resp.headers
    assert resp.json() == {
        "method": "GET",
        "path": "/a/b",
        "query": "x=1&y=2",
        "body": "",
        "version": "1.1",
        "keep_alive": True,
        "client": "127.0.0.1",
    }
    assert not conn.finished


def test_percent_encoded_path_is_decoded(make: MakeConn) -> None:
    conn = make()
    conn.send(req("GET", "/models/a%20b/predict?q=%20"))
    [resp] = conn.responses()
    assert resp.json()["path"] == "/models/a b/predict"
    assert resp.json()["query"] == "q=%20"


def test_keep_alive_serves_two_requests(make: MakeConn) -> None:
    conn = make()
    conn.send(req("GET", "/one"))
    conn.send(req("GET", "/two"))
    paths = [r.json()["path"] for r in conn.responses()]
    assert paths == ["/one", "/two"]
    assert not conn.finished


def test_request_split_into_single_bytes(make: MakeConn) -> None:
    conn = make()
    for byte in req("POST", "/split", body=b"hello"):
        conn.send(bytes([byte]))
    [resp] = conn.responses()
    assert resp.json()["body"] == "hello"


def test_pipelined_requests_are_answered_in_order(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    handler = Deferred(loop)
    conn = make(handler)
    conn.send(req("GET", "/1") + req("GET", "/2") + req("GET", "/3"))
    assert [r.path for r, _ in handler.calls] == ["/1", "/2", "/3"]
    handler.answer(2)
    handler.answer(1)
    settle(loop)
    assert conn.transport.data == b""  # /1 is not answered yet, so nothing may be written
    handler.answer(0)
    settle(loop)
    assert [r.json()["path"] for r in conn.responses()] == ["/1", "/2", "/3"]
    assert not conn.finished


def test_immediate_response_waits_behind_a_slow_one(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    slow = Deferred(loop)

    def handler(request: Request) -> HandlerResult:
        return slow(request) if request.path == "/slow" else echo(request)

    conn = make(handler)
    conn.send(req("GET", "/slow") + req("GET", "/fast"))
    assert conn.transport.data == b""
    slow.answer(0)
    settle(loop)
    assert [r.json()["path"] for r in conn.responses()] == ["/slow", "/fast"]


def test_coroutine_handler(make: MakeConn, loop: asyncio.AbstractEventLoop) -> None:
    async def handler(request: Request) -> Response:
        await asyncio.sleep(0)
        return echo(request)

    conn = make(handler)
    conn.send(req("GET", "/co"))
    settle(loop)
    [resp] = conn.responses()
    assert resp.json()["path"] == "/co"


def test_content_length_body(make: MakeConn) -> None:
    conn = make()
    request = req("POST", "/p", body=b"0123456789")
    conn.send(request[:-4])
    assert conn.transport.data == b""
    conn.send(request[-4:])
    [resp] = conn.responses()
    assert resp.json()["body"] == "0123456789"


def test_chunked_body(make: MakeConn) -> None:
    conn = make()
    head = req("POST", "/p", headers=[("Transfer-Encoding", "chunked")])
    conn.send(head + b"5\r\nhello\r\n")
    assert conn.transport.data == b""
    conn.send(b"6;ext=1\r\n world\r\n")
    conn.send(b"0\r\n\r\n")
    [resp] = conn.responses()
    assert resp.json()["body"] == "hello world"


def test_expect_100_continue(make: MakeConn) -> None:
    conn = make()
    conn.send(req("POST", "/p", headers=[("Expect", "100-continue"), ("Content-Length", "5")]))
    assert bytes(conn.transport.data) == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.send(b"hello")
    [resp] = conn.responses()
    assert resp.informational == [100]
    assert resp.status == 200
    assert resp.json()["body"] == "hello"


def test_expect_100_continue_waits_for_its_turn(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    """A pipelined request's 100 Continue must not be written in the middle of the previous
    request's (not yet written) response slot: it goes out once that response has."""
    handler = Deferred(loop)
    conn = make(handler)
    conn.send(req("GET", "/first"))
    conn.send(req("POST", "/p", headers=[("Expect", "100-continue"), ("Content-Length", "2")]))
    assert conn.transport.data == b""
    handler.answer(0)
    settle(loop)
    assert conn.transport.data.endswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    conn.send(b"hi")
    handler.answer(1)
    settle(loop)
    first, second = conn.responses()
    assert first.json()["path"] == "/first"
    assert second.informational == [100]
    assert second.status == 200


def test_expect_100_continue_with_too_large_body_gets_413_without_continue(
    make: MakeConn,
) -> None:
    conn = make(max_body=10)
    conn.send(req("POST", "/p", headers=[("Expect", "100-continue"), ("Content-Length", "11")]))
    assert b"100 Continue" not in conn.transport.data
    [resp] = conn.responses()
    assert resp.status == 413
    assert conn.finished


def test_unknown_expectation_gets_417(make: MakeConn) -> None:
    conn = make()
    conn.send(req("POST", "/p", headers=[("Expect", "something-else")], body=b"x"))
    [resp] = conn.responses()
    assert resp.status == 417
    assert conn.finished


def test_head_has_content_length_and_no_body(make: MakeConn) -> None:
    def handler(request: Request) -> Response:
        return Response(200, b"hello", b"text/plain")

    conn = make(handler)
    conn.send(req("HEAD", "/") + req("GET", "/"))
    assert b"hello" in conn.transport.data  # only once: the GET's
    assert conn.transport.data.count(b"hello") == 1
    head, get = conn.responses("HEAD", "GET")
    assert head.headers[b"content-length"] == b"5"
    assert head.body == b""
    assert get.body == b"hello"


def test_http11_without_host_gets_400(make: MakeConn) -> None:
    conn = make()
    conn.send(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n")
    [resp] = conn.responses()
    assert resp.status == 400
    assert "Host" in error_of(resp)
    assert conn.finished


@pytest.mark.parametrize("version", ["2.0", "0.9"])
def test_other_http_versions_get_505(make: MakeConn, version: str) -> None:
    conn = make()
    conn.send(f"GET / HTTP/{version}\r\nHost: test\r\n\r\n".encode())
    # h11 (the test's parser) refuses such exchanges, so read the status line itself.
    assert bytes(conn.transport.data).startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")
    assert b"HTTP/%s is not supported" % version.encode() in bytes(conn.transport.data)
    assert conn.finished


@pytest.mark.parametrize("version", ["2.0", "0.9", "1.0"])
def test_connection_keep_alive_does_not_pass_for_http11(make: MakeConn, version: str) -> None:
    """The version is inferred from llhttp's keep-alive verdict only when no Connection header
    was sent: with one, an HTTP/1.0 (or 2.0, 0.9) request asking to be kept alive is still read
    as the version it is."""
    conn = make()
    conn.send(f"GET / HTTP/{version}\r\nHost: t\r\nConnection: keep-alive\r\n\r\n".encode())
    data = bytes(conn.transport.data)
    if version == "1.0":
        [resp] = conn.responses()
        assert resp.json()["version"] == "1.0"
        assert resp.headers[b"connection"] == b"keep-alive"
        assert not conn.finished
    else:
        assert data.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")


def test_http11_with_connection_header_is_http11(make: MakeConn) -> None:
    conn = make()
    conn.send(req("GET", "/", [("Connection", "keep-alive")]))
    conn.send(req("GET", "/", [("Connection", "close")]))
    first, second = conn.responses()
    assert first.json()["version"] == "1.1" and first.json()["keep_alive"] is True
    assert second.json()["version"] == "1.1" and second.json()["keep_alive"] is False
    assert conn.finished


def test_half_closed_client_still_gets_its_pending_answers(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    deferred = Deferred(loop)
    conn = make(handler=deferred)
    conn.send(req("GET", "/a") + req("GET", "/b"))
    assert conn.protocol.eof_received() is True  # keep the transport open for the answers
    deferred.answer(1)
    deferred.answer(0)
    settle(loop)
    assert [r.status for r in conn.responses()] == [200, 200]
    assert conn.transport.closed


def test_half_close_with_nothing_pending_closes(make: MakeConn) -> None:
    conn = make()
    conn.send(req("GET", "/a"))
    assert [r.status for r in conn.responses()] == [200]
    assert conn.protocol.eof_received() is None  # asyncio closes the transport


def test_pause_takes_effect_within_one_large_read(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    # 1000 pipelined requests arrive in one read; the client stops reading after the third
    # answer (the transport calls pause_writing). Parsing must stop within a slice of the read
    # instead of answering all 1000 into the buffer, and go on when the client reads again.
    seen: list[str] = []
    conn: Conn

    def handler(request: Request) -> Response:
        seen.append(request.path)
        if len(seen) == 3:
            conn.protocol.pause_writing()
        return json_response({"path": request.path})

    conn = make(handler=handler)
    data = b"".join(req("GET", f"/{i}") for i in range(1000))
    assert len(data) > 2 * 16384
    conn.send(data)
    assert 3 <= len(seen) <= 1000 * 16384 // len(data) + 1  # at most one slice's requests
    assert not conn.transport.reading
    conn.protocol.resume_writing()
    settle(loop)
    assert seen == [f"/{i}" for i in range(1000)]
    assert [r.json()["path"] for r in conn.responses()] == seen


def test_http10_without_host_is_served(make: MakeConn) -> None:
    conn = make()
    conn.send(b"GET / HTTP/1.0\r\n\r\n")
    [resp] = conn.responses()
    assert resp.status == 200


def test_http10_closes_without_keep_alive(make: MakeConn) -> None:
    conn = make()
    conn.send(req("GET", "/", version="1.0"))
    [resp] = conn.responses()
    assert resp.headers[b"connection"] == b"close"
    assert resp.json()["version"] == "1.0"
    assert resp.json()["keep_alive"] is False
    assert conn.finished


def test_http10_keep_alive(make: MakeConn) -> None:
    conn = make()
    conn.send(req("GET", "/1", [("Connection", "keep-alive")], version="1.0"))
    conn.send(req("GET", "/2", [("Connection", "keep-alive")], version="1.0"))
    first, second = conn.responses()
    assert first.headers[b"connection"] == b"keep-alive"
    assert second.json()["path"] == "/2"
    assert not conn.finished


def test_connection_close_request(make: MakeConn) -> None:
    conn = make()
    # The request after "Connection: close" in the same packet is never read or answered.
    conn.send(req("GET", "/1", [("Connection", "close")]) + req("GET", "/2"))
    [resp] = conn.responses()
    assert resp.headers[b"connection"] == b"close"
    assert resp.json()["path"] == "/1"
    assert conn.finished


def test_close_without_half_close_support(make: MakeConn) -> None:
    conn = make(can_eof=False)
    conn.send(req("GET", "/", [("Connection", "close")]))
    assert conn.transport.closed
    [resp] = conn.responses()
    assert resp.status == 200


def test_upgrade_is_answered_as_plain_http_then_closed(make: MakeConn) -> None:
    conn = make()
    conn.send(req("GET", "/", [("Connection", "Upgrade"), ("Upgrade", "websocket")]))
    [resp] = conn.responses()
    assert resp.status == 200
    assert conn.finished


def test_status_without_reason_and_no_body_statuses(make: MakeConn) -> None:
    def handler(request: Request) -> Response:
        return Response(int(request.path[1:]), b"", None)

    conn = make(handler)
    conn.send(req("GET", "/299") + req("GET", "/204"))
    assert conn.transport.data.startswith(b"HTTP/1.1 299 ")
    odd, empty = conn.responses()
    assert odd.status == 299
    assert empty.status == 204
    assert b"content-length" not in empty.headers


# -- limits and malformed input -----------------------------------------------------------------


def error_of(resp: Resp) -> str:
    assert resp.headers[b"content-type"] == b"application/json"
    message = resp.json()["error"]
    assert isinstance(message, str)
    return message


def test_header_block_too_large(make: MakeConn) -> None:
    conn = make(max_header_bytes=1024)
    conn.send(req("GET", "/", [("X-Big", "a" * 1100)]))
    [resp] = conn.responses()
    assert resp.status == 431
    assert resp.headers[b"connection"] == b"close"
    assert "header" in error_of(resp)
    assert conn.finished


def test_header_block_too_large_across_many_headers(make: MakeConn) -> None:
    conn = make(max_header_bytes=1024)
    conn.send(req("GET", "/", [(f"X-H{i}", "v" * 90) for i in range(12)]))
    [resp] = conn.responses()
    assert resp.status == 431


def test_unfinished_header_line_is_bounded(make: MakeConn) -> None:
    """A header line that never ends is cut off before the parser buffers it without bound."""
    conn = make(max_header_bytes=1024, max_url=256)
    conn.send(b"GET / HTTP/1.1\r\nHost: test\r\nX-Endless: ")
    for _ in range(200):
        conn.send(b"a" * 100)
        if conn.finished:
            break
    [resp] = conn.responses()
    assert resp.status == 431
    assert conn.finished


def test_header_block_split_across_reads_with_body_is_accepted(make: MakeConn) -> None:
    """Headers well under the limit must pass however TCP splits them, even when the read that
    ends the header block also carries a large body."""
    conn = make(max_header_bytes=1024, max_body=100_000)
    request = req("POST", "/p", [(f"X-H{i}", "v" * 200) for i in range(3)], body=b"b" * 50_000)
    cut = request.index(b"X-H1")
    conn.send(request[:cut])
    conn.send(request[cut:])
    [resp] = conn.responses()
    assert resp.status == 200
    assert len(resp.json()["body"]) == 50_000


def test_header_block_trickled_under_the_limit_is_accepted(make: MakeConn) -> None:
    conn = make(max_header_bytes=1024)
    request = req("GET", "/", [(f"X-H{i}", "v" * 100) for i in range(7)])
    for i in range(0, len(request), 7):
        conn.send(request[i : i + 7])
    [resp] = conn.responses()
    assert resp.status == 200


def test_too_many_headers(make: MakeConn) -> None:
    conn = make(max_headers=5)
    conn.send(req("GET", "/", [(f"X-{i}", "v") for i in range(5)]))  # Host + 5
    [resp] = conn.responses()
    assert resp.status == 431
    assert "headers" in error_of(resp)


def test_as_many_headers_as_allowed(make: MakeConn) -> None:
    conn = make(max_headers=5)
    conn.send(req("GET", "/", [(f"X-{i}", "v") for i in range(4)]))  # Host + 4
    [resp] = conn.responses()
    assert resp.status == 200


def test_body_too_large_by_content_length_is_refused_before_the_body(make: MakeConn) -> None:
    calls: list[Request] = []

    def handler(request: Request) -> Response:
        calls.append(request)
        return echo(request)

    conn = make(handler, max_body=100)
    conn.send(req("POST", "/p", [("Content-Length", "101")]))  # headers only, no body sent
    [resp] = conn.responses()
    assert resp.status == 413
    assert resp.headers[b"connection"] == b"close"
    assert conn.finished
    # The body arriving afterwards is discarded (lingering close), never answered.
    written = bytes(conn.transport.data)
    conn.send(b"x" * 101)
    assert conn.transport.data == written
    assert calls == []


def test_body_at_the_limit_is_accepted(make: MakeConn) -> None:
    conn = make(max_body=100)
    conn.send(req("POST", "/p", body=b"x" * 100))
    [resp] = conn.responses()
    assert resp.status == 200


def test_body_too_large_chunked(make: MakeConn) -> None:
    conn = make(max_body=100)
    conn.send(req("POST", "/p", [("Transfer-Encoding", "chunked")]))
    conn.send(b"3c\r\n" + b"x" * 60 + b"\r\n")
    assert conn.transport.data == b""
    conn.send(b"3c\r\n" + b"x" * 60 + b"\r\n")
    [resp] = conn.responses()
    assert resp.status == 413
    assert conn.finished


def test_url_too_long(make: MakeConn) -> None:
    conn = make(max_url=100)
    conn.send(req("GET", "/" + "a" * 100))
    [resp] = conn.responses()
    assert resp.status == 414
    assert conn.finished


def test_url_too_long_trickled(make: MakeConn) -> None:
    conn = make(max_url=100)
    conn.send(b"GET /")
    for _ in range(50):
        conn.send(b"a" * 10)
        if conn.finished:
            break
    [resp] = conn.responses()
    assert resp.status == 414


def test_url_at_the_limit_is_accepted(make: MakeConn) -> None:
    conn = make(max_url=100)
    conn.send(req("GET", "/" + "a" * 99))
    [resp] = conn.responses()
    assert resp.status == 200


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: test\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: test\r\nX: a\r\n folded\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost: test\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: test\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: test\r\nContent-Length: +1\r\n\r\nx",
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        b"GET nothing-like-a-path HTTP/1.1\r\nHost: test\r\n\r\n",
        b"GET / HTTP/1.1\nHost: test\n\n",  # bare LF
    ],
)
def test_malformed_request_gets_400_then_close(make: MakeConn, data: bytes) -> None:
    conn = make()
    conn.send(data)
    [resp] = conn.responses()
    assert resp.status == 400
    assert resp.headers[b"connection"] == b"close"
    error_of(resp)
    assert conn.finished
    # Whatever follows on the broken stream is ignored.
    written = bytes(conn.transport.data)
    conn.send(req("GET", "/after"))
    assert conn.transport.data == written


@pytest.mark.parametrize(
    "headers",
    [
        [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
        [("Content-Length", "5"), ("Content-Length", "6")],
        [("Content-Length", "5, 6")],
        [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "identity")],
        [("Transfer-Encoding", "identity")],
        [("Transfer-Encoding", "chunked, gzip")],
        [("Host", "other")],  # a second Host: which one is the target's?
    ],
)
def test_request_smuggling_attempts_get_400(make: MakeConn, headers: list[tuple[str, str]]) -> None:
    conn = make()
    conn.send(req("POST", "/p", headers) + b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    [resp] = conn.responses()
    assert resp.status == 400
    assert conn.finished
    assert b"smuggled" not in conn.transport.data


def test_error_after_pipelined_requests_comes_after_their_responses(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    handler = Deferred(loop)
    conn = make(handler)
    conn.send(req("GET", "/1") + b"BROKEN\r\n\r\n")
    assert conn.transport.data == b""
    handler.answer(0)
    settle(loop)
    ok, bad = conn.responses()
    assert ok.status == 200
    assert bad.status == 400
    assert conn.finished


# -- backpressure -----------------------------------------------------------------------------


def test_pause_writing_pauses_reading(make: MakeConn) -> None:
    conn = make()
    conn.protocol.pause_writing()
    assert not conn.transport.reading
    conn.protocol.resume_writing()
    assert conn.transport.reading


def test_full_pipeline_pauses_reading(make: MakeConn, loop: asyncio.AbstractEventLoop) -> None:
    handler = Deferred(loop)
    conn = make(handler, max_pipeline=3)
    conn.send(req("GET", "/1") + req("GET", "/2"))
    assert conn.transport.reading
    conn.send(req("GET", "/3"))
    assert not conn.transport.reading
    handler.answer(0)
    settle(loop)
    assert conn.transport.reading
    handler.answer(1)
    handler.answer(2)
    settle(loop)
    assert len(conn.responses()) == 3


def test_reading_resumes_only_when_both_pipeline_and_writes_allow(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    handler = Deferred(loop)
    conn = make(handler, max_pipeline=1)
    conn.send(req("GET", "/1"))
    assert not conn.transport.reading
    conn.protocol.pause_writing()
    handler.answer(0)
    settle(loop)
    assert not conn.transport.reading  # the pipeline has room, but the client is not reading
    conn.protocol.resume_writing()
    assert conn.transport.reading


# -- deadlines --------------------------------------------------------------------------------


def test_half_sent_header_block_gets_408_and_close(make: MakeConn) -> None:
    conn = make(header_timeout=5.0)
    conn.send(b"GET / HTTP/1.1\r\nHost: te")
    deadline_passed(conn, 4.0)
    assert conn.transport.data == b""
    deadline_passed(conn, 5.5)
    [resp] = conn.responses()
    assert resp.status == 408
    assert resp.headers[b"connection"] == b"close"
    assert conn.transport.eof
    # The lingering close ends in a close of its own after a moment.
    deadline_passed(conn, 10.0)
    assert conn.transport.closed


def test_half_sent_body_gets_408(make: MakeConn) -> None:
    conn = make(body_timeout=5.0)
    conn.send(req("POST", "/p", [("Content-Length", "10")]) + b"12345")
    deadline_passed(conn, 5.5)
    [resp] = conn.responses()
    assert resp.status == 408
    assert conn.finished


def test_header_deadline_is_not_extended_by_trickling(make: MakeConn) -> None:
    conn = make(header_timeout=5.0)
    conn.send(b"G")
    start = conn.loop.time()
    conn.send(b"ET / HTTP/1.1\r\n")
    conn.state.tick(start + 3.0)
    conn.send(b"Host: test\r\n")
    conn.state.tick(start + 5.5)
    [resp] = conn.responses()
    assert resp.status == 408


def test_idle_keep_alive_connection_is_closed(make: MakeConn) -> None:
    conn = make(keepalive_timeout=20.0)
    conn.send(req())
    deadline_passed(conn, 19.0)
    assert not conn.finished
    deadline_passed(conn, 21.0)
    assert conn.transport.closed
    assert len(conn.responses()) == 1  # closed silently: nothing written after the response


def test_silent_new_connection_is_closed_after_header_timeout(make: MakeConn) -> None:
    conn = make(header_timeout=5.0)
    deadline_passed(conn, 5.5)
    assert conn.transport.closed
    assert conn.transport.data == b""


def test_no_deadline_while_the_handler_works(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    handler = Deferred(loop)
    conn = make(handler, header_timeout=1.0, body_timeout=1.0, keepalive_timeout=1.0)
    conn.send(req())
    deadline_passed(conn, 100.0)
    assert not conn.finished
    handler.answer(0)
    settle(loop)
    [resp] = conn.responses()
    assert resp.status == 200


def test_tick_without_now_only_refreshes_date(make: MakeConn) -> None:
    conn = make(header_timeout=0.001)
    conn.state.heads.date_header = b""
    conn.state.tick()
    assert conn.state.heads.date_header.startswith(b"date: ")
    assert not conn.finished


# -- handler errors ---------------------------------------------------------------------------


def test_handler_http_error(make: MakeConn) -> None:
    def handler(request: Request) -> Response:
        raise NotFound("no such thing", headers=[(b"x-why", b"because")])

    conn = make(handler)
    conn.send(req("GET", "/missing") + req("GET", "/again"))
    first, second = conn.responses()
    assert first.status == 404
    assert first.json() == {"error": "no such thing"}
    assert first.headers[b"x-why"] == b"because"
    assert second.status == 404
    assert not conn.finished  # an application error does not break the connection


def test_future_failing_with_http_error(make: MakeConn, loop: asyncio.AbstractEventLoop) -> None:
    handler = Deferred(loop)
    conn = make(handler)
    conn.send(req())
    handler.calls[0][1].set_exception(BadRequest("bad input"))
    settle(loop)
    [resp] = conn.responses()
    assert resp.status == 400
    assert resp.json() == {"error": "bad input"}
    assert not conn.finished


def test_handler_crash_is_500_and_connection_keeps_serving(
    make: MakeConn, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise ZeroDivisionError("boom")
        return echo(request)

    conn = make(handler)
    conn.send(req("GET", "/boom") + req("GET", "/fine"))
    boom, fine = conn.responses()
    assert boom.status == 500
    assert boom.json() == {"error": "internal server error"}
    assert "boom" not in boom.body.decode()  # internals are logged, not sent
    assert fine.status == 200
    assert not conn.finished
    assert "ZeroDivisionError" in caplog.text


def test_future_crash_is_500(make: MakeConn, loop: asyncio.AbstractEventLoop) -> None:
    handler = Deferred(loop)
    conn = make(handler)
    conn.send(req("GET", "/1") + req("GET", "/2"))
    handler.calls[0][1].set_exception(RuntimeError("kaput"))
    handler.answer(1)
    settle(loop)
    first, second = conn.responses()
    assert first.status == 500
    assert second.status == 200


def test_client_gone_cancels_pending_futures(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    handler = Deferred(loop)
    conn = make(handler)
    conn.send(req())
    conn.protocol.connection_lost(None)
    assert handler.calls[0][1].cancelled()
    assert conn.protocol not in conn.state.connections


def test_observer_sees_every_request(loop: asyncio.AbstractEventLoop, make: MakeConn) -> None:
    seen: list[tuple[str, int]] = []

    def handler(request: Request) -> Response:
        if request.path == "/missing":
            raise NotFound("missing")
        return echo(request)

    state = ServerState(handler, Limits(), lambda r, status, secs: seen.append((r.path, status)))
    conn = make(state=state)
    conn.send(req("GET", "/a") + req("GET", "/missing"))
    assert seen == [("/a", 200), ("/missing", 404)]


# -- graceful drain ---------------------------------------------------------------------------


def test_drain_closes_idle_and_finishes_busy(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    handler = Deferred(loop)
    state = ServerState(handler, Limits())
    idle = make(state=state)
    fresh = make(state=state)
    busy = make(state=state)
    idle.send(req("GET", "/idle"))
    handler.answer(0)
    settle(loop)
    busy.send(req("GET", "/busy"))

    state.start_draining()
    settle(loop)
    assert idle.transport.closed
    assert len(idle.responses()) == 1
    assert fresh.transport.closed
    assert fresh.transport.data == b""
    assert not busy.finished

    handler.answer(1)
    settle(loop)
    [resp] = busy.responses()
    assert resp.json()["path"] == "/busy"
    assert resp.headers[b"connection"] == b"close"
    assert busy.finished
    deadline_passed(busy, 5.0)  # the lingering close ends
    assert busy.transport.closed
    loop.run_until_complete(asyncio.wait_for(state.wait_closed(), 1.0))
    assert state.connections == set()


def test_connection_accepted_while_draining_is_closed(make: MakeConn) -> None:
    state = ServerState(echo, Limits())
    state.start_draining()
    conn = make(state=state)
    assert conn.transport.closed


def test_drain_lets_a_request_being_received_finish(make: MakeConn) -> None:
    """A client in the middle of sending its request when shutdown starts gets its answer."""
    state = ServerState(echo, Limits())
    conn = make(state=state)
    request = req("POST", "/upload", body=b"0123456789")
    conn.send(request[:-5])
    state.start_draining()
    assert not conn.finished
    conn.send(request[-5:])
    [resp] = conn.responses()
    assert resp.status == 200
    assert resp.json()["body"] == "0123456789"
    assert resp.headers[b"connection"] == b"close"
    assert conn.finished


def test_drain_answers_every_pipelined_request_already_taken(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    """Requests already handed to the handler have run (perhaps a training step): their responses
    are written, and only the last carries ``connection: close``."""
    handler = Deferred(loop)
    state = ServerState(handler, Limits())
    conn = make(state=state)
    conn.send(req("GET", "/1") + req("GET", "/2"))
    state.start_draining()
    handler.answer(0)
    handler.answer(1)
    settle(loop)
    first, second = conn.responses()
    assert first.json()["path"] == "/1"
    assert b"connection" not in first.headers
    assert second.json()["path"] == "/2"
    assert second.headers[b"connection"] == b"close"
    assert conn.finished


def test_absolute_form_target(make: MakeConn) -> None:
    conn = make()
    conn.send(req("GET", "http://example.com:8080/a/b?x=1"))
    [resp] = conn.responses()
    assert resp.json()["path"] == "/a/b"
    assert resp.json()["query"] == "x=1"


@pytest.mark.parametrize("target", ["http://a:99999/", "http://a:b/x", "http://[/"])
def test_invalid_absolute_form_target_gets_400(make: MakeConn, target: str) -> None:
    """llhttp accepts these targets but httptools.parse_url refuses them: the request must still
    get an answer (it used to leave the connection waiting forever)."""
    conn = make()
    conn.send(req("GET", target) + req("GET", "/next"))
    [resp] = conn.responses()
    assert resp.status == 400
    assert conn.finished
    assert conn.protocol.slots == deque()


# Every form a request target takes (RFC 9112 3.2), with its parts: what the handler sees, or
# the refusal. Absolute-form targets without a query crashed the compiled build (issue 19: its
# URL parser's stub types the missing parts bytes; they are None): these run against the
# compiled module whenever scripts/compile built it.
TARGET_FORMS = [
    ("GET", "http://h/v2", 200, "/v2", ""),
    ("GET", "http://h/v2?x=1", 200, "/v2", "x=1"),
    ("GET", "http://h", 200, "/", ""),
    ("GET", "http://h/", 200, "/", ""),
    ("GET", "http://h?x=1", 200, "/", "x=1"),
    ("GET", "http://h:8080/a/b%20c", 200, "/a/b c", ""),
    ("GET", "https://h/a?q=1#frag", 200, "/a", "q=1"),
    ("GET", "http://h/a#frag", 200, "/a", ""),
    ("GET", "HTTP://h/up", 200, "/up", ""),
    ("GET", "http://[::1]:80/six", 200, "/six", ""),
    ("OPTIONS", "http://h/v2", 200, "/v2", ""),
    ("OPTIONS", "*", 200, "*", ""),
    ("GET", "*", 400, "", ""),
    ("OPTIONS", "*?x", 400, "", ""),
    ("GET", "http://user:pw@h/a", 400, "", ""),
    ("GET", "h:80", 400, "", ""),
    ("GET", "ftp://h/a", 400, "", ""),
    ("CONNECT", "h:80", 405, "", ""),
    ("CONNECT", "http://h/v2", 405, "", ""),
    ("CONNECT", "/v2", 405, "", ""),
]


@pytest.mark.parametrize(("method", "target", "status", "path", "query"), TARGET_FORMS)
def test_request_target_forms(
    make: MakeConn,
    caplog: pytest.LogCaptureFixture,
    method: str,
    target: str,
    status: int,
    path: str,
    query: str,
) -> None:
    conn = make()
    with caplog.at_level(logging.ERROR, logger="webtorch"):
        conn.send(req(method, target) + req("GET", "/next"))
        settle(conn.loop)
    assert caplog.records == []  # the compiled build logged a traceback and hung up
    responses = conn.responses()
    assert [r.status for r in responses][:1] == [status]
    first = responses[0]
    if status == 200:
        assert (first.json()["path"], first.json()["query"]) == (path, query)
        assert [r.json()["path"] for r in responses[1:]] == ["/next"]
        assert not conn.finished
    else:
        assert "error" in first.json()
        assert conn.finished
    if status == 405:
        assert b"GET" in first.headers[b"allow"]


def test_absolute_form_target_on_a_streamed_route(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    """A route that takes its body as a stream (a proxied one) is matched at the headers, by
    the same target parsing."""
    seen: list[Request] = []

    def handler(request: Request) -> Response:
        seen.append(request)
        return json_response({"path": request.path, "target": request.target.decode()})

    route = Route("/up/", handler, "up", prefix=True, stream=True)
    state = ServerState(
        echo, Limits(), stream_match=lambda p: route if p.startswith("/up/") else None
    )
    conn = make(state=state)
    conn.send(req("POST", "http://h/up/load", body=b"abc") + req("GET", "http://h/other"))
    settle(loop)
    assert [r.status for r in conn.responses()] == [200, 200]
    [request] = seen
    assert (request.path, request.target) == ("/up/load", b"/up/load")
    assert request.stream is not None and request.stream.received == 3


class EndlessClient(FakeTransport):
    """A client that pipelines without end: whenever the server reads the socket again, another
    ``chunk`` has arrived (up to ``reads`` of them), as the kernel's buffer would hold it."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, protocol: HttpProtocol, chunk: bytes, reads: int
    ) -> None:
        super().__init__(loop, protocol)
        self.chunk = chunk
        self.reads_left = reads
        self.reads = 0

    def resume_reading(self) -> None:
        super().resume_reading()
        self.loop.call_soon(self._arrive)

    def _arrive(self) -> None:
        if self.reading and self.reads_left and not self.closed:  # no read while paused
            self.reads_left -= 1
            self.reads += 1
            self.protocol.data_received(self.chunk)


def held(protocol: HttpProtocol) -> int:
    """Input read from the socket and not parsed yet."""
    return len(protocol._unparsed) - protocol._unparsed_at


def test_pipelined_input_is_parsed_before_the_socket_is_read_again(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Issue 19: with answers pending (a model batch), parsing pauses within a read; when the
    answers went out, reading resumed at once, so each pause added a read to what was held and
    each resume copied all of it (44-77 MB per connection, quadratic work). Held input must be
    parsed before the socket is read again: at most one read is ever held."""
    handler = Deferred(loop)
    state = ServerState(handler, Limits(max_pipeline=8))
    protocol = HttpProtocol(state, loop)
    one = req("GET", "/p")
    chunk = one * (2 * 16384 // len(one) + 1)  # a read of three slices' worth of requests
    transport = EndlessClient(loop, protocol, chunk, reads=3)
    protocol.connection_made(transport)  # type: ignore[arg-type]

    transport.reading = True
    protocol.data_received(chunk)
    most_held = held(protocol)
    answered = 0
    while answered < len(handler.calls):
        while answered < len(handler.calls):  # the batch completes
            handler.answer(answered)
            answered += 1
        settle(loop)
        most_held = max(most_held, held(protocol))
        assert held(protocol) == 0 or not transport.reading
    assert transport.reads == 3
    assert answered == 4 * chunk.count(b"GET ")
    assert most_held < len(chunk)
    assert transport.errors == []
    assert transport.data.count(b"HTTP/1.1 200 OK\r\n") == answered


# -- the connection cap (issue 19: idle sockets exhausted the descriptors, silently) -----------


def test_connection_cap_closes_the_idle_connection_nearest_its_timeout(
    make: MakeConn, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    state = ServerState(echo, Limits(max_connections=3, keepalive_timeout=75.0))
    kept = make(state=state)
    kept.send(req("GET", "/served"))  # answered: idle, kept alive for 75 s
    silent = make(state=state)  # no request yet: idle, closed after the header timeout (10 s)
    busy = make(state=state)
    busy.send(b"GET /half HTTP/1.1\r\n")  # a request on its way: never taken
    assert len(state.connections) == 3
    with caplog.at_level(logging.WARNING, logger="webtorch.http"):
        newcomer = make(state=state)
    assert silent.transport.closed  # nearest its timeout of the idle two
    assert not kept.transport.closed and not busy.transport.closed
    assert state.connections == {kept.protocol, busy.protocol, newcomer.protocol}
    assert state.reclaimed == 1
    assert "connection cap reached" in caplog.text
    newcomer.send(req("GET", "/new"))
    assert [r.status for r in newcomer.responses()] == [200]
    settle(loop)

    # Next, the kept-alive one goes; then none is idle, and a newcomer gets a 503 at once.
    make(state=state).send(b"GET /half HTTP/1.1\r\n")
    assert kept.transport.closed
    newcomer.send(b"GET /half HTTP/1.1\r\n")
    refused = make(state=state)
    assert refused.transport.closed
    [resp] = refused.responses()
    assert resp.status == 503
    assert resp.headers[b"connection"] == b"close"
    assert "error" in resp.json()
    assert len(state.connections) == 3
    assert (state.reclaimed, state.refused) == (2, 1)
    settle(loop)  # connection_lost of the refused and reclaimed ones
    assert len(state.connections) == 3


def test_connection_cap_log_is_rate_limited(
    make: MakeConn, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    state = ServerState(echo, Limits(max_connections=1))
    make(state=state).send(b"GET /half HTTP/1.1\r\n")
    with caplog.at_level(logging.WARNING, logger="webtorch.http"):
        for _ in range(5):
            make(state=state)
    assert state.refused == 5
    assert caplog.text.count("connection cap reached") == 1
    settle(loop)


def test_connection_refused_at_the_cap_is_released_by_the_gate(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    """The guard's per-address counts stay right for a connection the cap refuses."""

    class Gate:
        def __init__(self) -> None:
            self.open = 0

        def admit(self, address: str) -> bool:
            self.open += 1
            return True

        def release(self, address: str) -> None:
            self.open -= 1

    state = ServerState(echo, Limits(max_connections=1))
    state.gate = gate = Gate()
    make(state=state).send(b"GET /half HTTP/1.1\r\n")
    refused = make(state=state)
    settle(loop)
    assert refused.transport.closed
    assert gate.open == 1


def test_expect_check_refusal_comes_without_100_and_after_earlier_answers(
    make: MakeConn, loop: asyncio.AbstractEventLoop
) -> None:
    handler = Deferred(loop)
    state = ServerState(handler, Limits())

    def check(request: Request) -> None:
        if request.path == "/locked":
            raise Unauthorized("no token")

    state.expect_check = check
    conn = make(state=state)
    expect = [("Expect", "100-continue"), ("Content-Length", "3")]
    conn.send(req("GET", "/first") + req("POST", "/locked", expect))
    assert conn.transport.data == b""  # the refusal waits for /first's answer
    handler.answer(0)
    settle(loop)
    first, refused = conn.responses()
    assert (first.status, refused.status) == (200, 401)
    assert refused.informational == []
    assert b"100 Continue" not in conn.transport.data
    assert conn.finished
    assert [r.path for r, _ in handler.calls] == ["/first"]


def test_expect_check_that_fails_lets_the_request_go_on(
    make: MakeConn, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a check is logged; the client still gets its 100 and its handler's answer."""
    state = ServerState(echo, Limits())

    def broken(request: Request) -> None:
        raise RuntimeError("bug")

    state.expect_check = broken
    conn = make(state=state)
    with caplog.at_level(logging.ERROR, logger="webtorch.http"):
        conn.send(req("POST", "/p", [("Expect", "100-continue"), ("Content-Length", "3")]))
        assert conn.transport.data == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.send(b"abc")
    [resp] = conn.responses()
    assert (resp.informational, resp.status, resp.json()["body"]) == ([100], 200, "abc")
    assert "pre-body check failed" in caplog.text


def test_transfer_coding_other_than_chunked_gets_501(make: MakeConn) -> None:
    """llhttp takes "gzip, chunked" and hands on the body still gzipped, as if plain."""
    conn = make()
    conn.send(
        req("POST", "/p", [("Transfer-Encoding", "gzip, chunked")]) + b"3\r\nabc\r\n0\r\n\r\n"
    )
    [resp] = conn.responses()
    assert resp.status == 501
    assert "chunked" in resp.json()["error"]
    assert conn.finished
