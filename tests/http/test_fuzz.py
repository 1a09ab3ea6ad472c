"""Random and mutated request bytes never break the server.

Whatever a client sends, the server answers with well-formed HTTP responses whose statuses are
1xx/2xx/4xx (a 5xx would mean the server, not the client, is at fault) or closes the connection;
it never raises, never writes after closing, and keeps serving other clients. Mostly run against
the fake-transport protocol (fast, and it splits the input at random points), plus a few examples
against a real listening server.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import webtorch.http
from tests.conftest import Running, serve_in_thread, xor_config
from tests.http.test_conformance import assert_serving
from tests.http.test_protocol import (
    Conn,
    echo,
    parse_responses,
    req,
    settle,
)
from tests.proxy.upstreams import upstreams
from webtorch import compiled
from webtorch import config as wt_config
from webtorch.errors import NotFound
from webtorch.http.limits import Limits
from webtorch.http.messages import HandlerResult, Request, Response
from webtorch.http.protocol import HttpProtocol
from webtorch.http.state import ServerState

FUZZ = settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure is reproducible, never flaky
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Small limits, so that mutations reach them.
LIMITS = Limits(max_url=256, max_header_bytes=1024, max_headers=12, max_body=512)

CORPUS = [
    req("GET", "/"),
    req("GET", "/a/b?x=1&y=%20"),
    req("HEAD", "/head"),
    req("POST", "/p", [("Content-Type", "application/json")], b'{"inputs": [[0, 1]]}'),
    req("POST", "/c", [("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n0\r\n\r\n",
    req("POST", "/e", [("Expect", "100-continue"), ("Content-Length", "3")]) + b"abc",
    req("GET", "/1") + req("GET", "/2") + req("POST", "/3", body=b"xyz"),
    req("GET", "/old", version="1.0"),
    req("GET", "/ka", [("Connection", "keep-alive")], version="1.0"),
    req("GET", "/close", [("Connection", "close")]) + req("GET", "/after"),
    # Every request-target form (RFC 9112 3.2): absolute-form with and without each part (one
    # without a query crashed the compiled build: issue 19), asterisk- and authority-form.
    req("GET", "http://example.com/abs?q"),
    req("GET", "http://example.com/abs"),
    req("POST", "http://example.com/p", body=b"xyz"),
    req("GET", "http://example.com"),
    req("GET", "http://example.com?q=1"),
    req("GET", "https://example.com:8443/a/b%20c#frag"),
    req("GET", "http://user@example.com:8080/abs"),
    req("GET", "http://[::1]:8080/v6"),
    req("OPTIONS", "*"),
    req("GET", "*"),
    req("CONNECT", "example.com:443"),
    req("GET", "/missing"),
]

TOKENS = [
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b"\x00",
    b"\xff",
    b"%",
    b"%00",
    b"?",
    b"#",
    b"HEAD",
    b"HTTP/1.0",
    b"Content-Length: 5\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Content-Length: -1\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Host: other\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close\r\n",
    b"Connection: upgrade\r\nUpgrade: websocket\r\n",
    b"0\r\n\r\n",
    b"ffffffffffffffffff\r\n",
    b"X: " + b"v" * 300 + b"\r\n",
    b"\r\n\r\n",
    b"http://",
    b":99999",
    b"[",
    b"@",
    b"http://h",
    b"https://h:1/",
    b"*",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(0, 5))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["set", "insert", "delete", "duplicate", "truncate"]))
        if op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.sampled_from(TOKENS) | st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "duplicate":
            j = draw(st.integers(i, min(len(data), i + 64)))
            data[j:j] = data[i:j]
        else:
            del data[i:]
    return bytes(data)


requests = mutated() | st.binary(max_size=300)


# The modules of HttpProtocol's layers, bottom up (http/connection.py lists them).
LAYERS = ("connection", "flow", "delivery", "streams", "protocol")


def _interpreted_protocol() -> ModuleType:
    """``protocol.py`` run by the interpreter, whatever scripts/compile built: RecordingProtocol
    below overrides a method, which a compiled class does not allow (webtorch/compiled.py), and
    an interpreted class cannot subclass a compiled one, so every layer of HttpProtocol is
    loaded from its source, each on the interpreted one below it (the modules beside them, such
    as state.py, stay as built). The compiled build gets the same inputs in
    ``test_compiled_protocol_survives_any_input``."""
    built = {name: sys.modules[f"webtorch.http.{name}"] for name in LAYERS}
    module = None
    try:
        for name in LAYERS:
            # Under the real name while it loads, so the layer above imports this one.
            full = f"webtorch.http.{name}"
            path = Path(webtorch.http.__file__).with_name(f"{name}.py")
            spec = importlib.util.spec_from_file_location(full, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module
            spec.loader.exec_module(module)
    finally:
        for name, original in built.items():
            sys.modules[f"webtorch.http.{name}"] = original
    assert module is not None
    return module


interpreted = _interpreted_protocol()


class RecordingProtocol(interpreted.HttpProtocol):  # type: ignore[misc,name-defined]
    """Notes whether each written response answers a HEAD (no body), for the h11 parse."""

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(state, loop)
        self.methods: list[str] = []

    def _write(self, transport: Any, response: Response, slot: Any, keep_alive: bool) -> None:
        self.methods.append("HEAD" if slot.head else "GET")
        super()._write(transport, response, slot, keep_alive)


async def later(request: Request) -> Response:
    return echo(request)


def handler(request: Request) -> HandlerResult:
    if request.path == "/missing":
        raise NotFound("missing")
    if request.path in ("/1", "/3"):
        return later(request)  # answered on a later loop iteration, out of line
    return echo(request)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def check_output(conn: Conn, methods: list[str]) -> None:
    assert conn.transport.errors == []
    responses = parse_responses(conn.transport.data, methods, eof=conn.finished)
    statuses = [r.status for r in responses]
    # 505 answers a request line of another HTTP version, 501 a transfer coding or an upgrade
    # it does not do: the client's doing, not a crash.
    assert all(s < 500 or s in (501, 505) for s in statuses), statuses
    for resp in responses:
        if resp.status >= 400:
            assert "error" in resp.json()


def send_in_pieces(
    conn: Conn, loop: asyncio.AbstractEventLoop, data: bytes, cuts: list[int]
) -> None:
    """``data`` in reads split at ``cuts``, then whatever those reads scheduled."""
    points = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        conn.send(data[start:end])
    settle(loop)


def expire_deadlines(state: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Every deadline passes, then those a lingering close sets."""
    state.tick(loop.time() + 1000.0)
    settle(loop)
    state.tick(loop.time() + 2000.0)
    settle(loop)


def assert_still_serves(state: Any, loop: asyncio.AbstractEventLoop, protocol_class: Any) -> None:
    fresh = Conn(state, loop, protocol_class=protocol_class)
    fresh.send(req("GET", "/ok"))
    [resp] = fresh.responses()
    assert resp.status == 200
    assert fresh.transport.errors == []


@FUZZ
@given(data=requests, cuts=st.lists(st.integers(0, 400), max_size=4))
def test_protocol_survives_any_input(
    loop: asyncio.AbstractEventLoop, data: bytes, cuts: list[int]
) -> None:
    state = interpreted.ServerState(handler, LIMITS)
    conn = Conn(state, loop, protocol_class=RecordingProtocol)
    protocol = conn.protocol
    assert isinstance(protocol, RecordingProtocol)

    send_in_pieces(conn, loop, data, cuts)
    check_output(conn, protocol.methods)

    # Whatever state it was left in, the deadlines end it (at worst after a lingering close).
    expire_deadlines(state, loop)
    check_output(conn, protocol.methods)
    assert conn.transport.closed

    # And the server still serves a well-behaved client.
    assert_still_serves(state, loop, interpreted.HttpProtocol)


@FUZZ
@given(data=requests, cuts=st.lists(st.integers(0, 400), max_size=4))
def test_compiled_protocol_survives_any_input(
    loop: asyncio.AbstractEventLoop, data: bytes, cuts: list[int]
) -> None:
    """The module as it runs in the server (compiled when scripts/compile built it): never
    raises, never writes after closing, ends every connection, and keeps serving."""
    state = ServerState(handler, LIMITS)
    conn = Conn(state, loop)
    with capture_errors() as errors:
        send_in_pieces(conn, loop, data, cuts)
        check_statuses(conn, data)
        expire_deadlines(state, loop)
    # A failure inside the protocol is logged and the connection dropped: the client's input
    # must never be able to get there (issue 19: a traceback per request, no answer).
    assert errors == []
    assert conn.transport.errors == []
    assert conn.transport.closed
    check_statuses(conn, data)
    assert_still_serves(state, loop, HttpProtocol)


def test_the_compiled_protocol_is_what_runs_when_built() -> None:
    """The test above exercises the extension whenever scripts/compile built one, not a
    silently preferred source (webtorch/compiled.py: the suite refuses stale builds)."""
    layers = [cls for cls in HttpProtocol.__mro__ if cls.__module__.startswith("webtorch.")]
    assert [cls.__module__ for cls in layers] == [f"webtorch.http.{n}" for n in LAYERS[::-1]]
    for cls in layers:
        module = sys.modules[cls.__module__]
        built = compiled.extension(cls.__module__.replace(".", "/") + ".py")
        if built is None:
            assert module.__file__ is not None and module.__file__.endswith(".py")
        else:
            assert module.__file__ == str(built)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


@contextmanager
def capture_errors() -> Iterator[list[str]]:
    """Error records of webtorch's loggers while the block runs (caplog is per test, and
    hypothesis runs many examples per test)."""
    handler = _Errors()
    logger = logging.getLogger("webtorch")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def check_statuses(conn: Conn, data: bytes) -> None:
    """What check_output checks, for a protocol that cannot note its HEAD requests (a compiled
    class takes no overrides): the status lines, and the framing when no HEAD can be in it."""
    out = bytes(conn.transport.data)
    if out:
        assert out.startswith(b"HTTP/1.1 ")
    statuses = [int(s) for s in STATUS_LINE.findall(out)]
    # 505 answers a request line of another HTTP version, 501 a transfer coding or an upgrade
    # it does not do: the client's doing, not a crash.
    assert all(s < 500 or s in (501, 505) for s in statuses), statuses
    if b"HEAD" not in data:
        responses = parse_responses(out, eof=conn.finished)
        for resp in responses:
            if resp.status >= 400:
                assert "error" in resp.json()


# -- a few examples against a real server ----------------------------------------------------


@pytest.fixture(scope="module")
def real() -> Iterator[Running]:
    with serve_in_thread(
        xor_config(**{k: getattr(LIMITS, k) for k in ("max_url", "max_body")})
    ) as r:
        yield r


STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


@settings(FUZZ, max_examples=100)
@given(data=requests)
def test_real_server_survives_any_input(real: Running, data: bytes) -> None:
    with closing(socket.create_connection((real.host, real.port), 5.0)) as sock:
        sock.settimeout(5.0)
        sock.sendall(data)
        # Half-close: the server sees the end of the input and closes after its answers.
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    if received:
        assert received.startswith(b"HTTP/1.1 ")
    statuses = [int(s) for s in STATUS_LINE.findall(received)]
    # 505 answers a request line of another HTTP version, 501 a transfer coding or an upgrade
    # it does not do: the client's doing, not a crash.
    assert all(s < 500 or s in (501, 505) for s in statuses), statuses
    if b"HEAD" not in data:
        parse_responses(received, eof=True)
    assert_serving(real)


def _exchange(running: Running, data: bytes, count: int) -> list[Any]:
    """Send ``data``, read ``count`` responses (no half-close: the proxy drops what it forwards
    for a client that has gone, as nginx does)."""
    with closing(socket.create_connection((running.host, running.port), 5.0)) as sock:
        sock.settimeout(5.0)
        sock.sendall(data)
        received = bytearray()
        while len(responses := parse_responses(received)) < count:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {len(responses)} responses: {bytes(received)!r}"
            received += chunk
    return responses


ABSOLUTE_TARGETS = ["http://h/v2", "http://h/v2/health/live?x=1", "https://h:8443/v2#f"]


@pytest.mark.parametrize("target", ABSOLUTE_TARGETS)
def test_real_server_answers_absolute_form_targets(real: Running, target: str) -> None:
    """The issue 19 reproduction: ``GET http://h/v2`` got no answer from the compiled build."""
    [resp, after] = _exchange(real, req("GET", target) + req("GET", "/v2/health/live"), 2)
    assert (resp.status, after.status) == (200, 200)


def test_proxied_route_answers_absolute_form_targets() -> None:
    """Proxied routes match their targets at the headers (to stream bodies): same parsing."""
    with upstreams("a") as (a,):
        cfg = wt_config.from_dict(
            {
                "upstreams": {"backend": {"servers": [a.address]}},
                "routes": [{"prefix": "/", "upstream": "backend"}],
            }
        )
        with serve_in_thread(cfg) as running:
            data = (
                req("GET", "http://h/echo")
                + req("POST", "http://h/echo", body=b"abc")
                + req("GET", "http://h/echo?x=1")
            )
            responses = _exchange(running, data, 3)
    assert [r.status for r in responses] == [200, 200, 200]
    assert [r.json()["target"] for r in responses] == ["/echo", "/echo", "/echo?x=1"]
