"""The server-wide connection cap (nginx's worker_connections) and the file descriptor probe.

Issue 19: 1,500 idle sockets exhausted 1,024 descriptors and locked every client out for the
header timeout, with nothing logged. The cap's decisions are tested deterministically on fake
transports in test_protocol.py; here a real server shows them end to end.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
from contextlib import ExitStack

import h11
import pytest

from tests.conftest import serve_in_thread, xor_config
from tests.http.test_conformance import Reader, connect, server_connections
from tests.http.test_protocol import echo, req
from tests.serve.test_server_models import metric, metrics
from webtorch.http import server as http_server
from webtorch.http.limits import Limits
from webtorch.http.server import HttpServer, connection_cap

HEALTH = req("GET", "/v2/health/live")


def served(sock: socket.socket, reader: Reader) -> bool:
    """Whether the connection still answers a request (False: the server closed it)."""
    try:
        sock.sendall(HEALTH)
    except (BrokenPipeError, ConnectionResetError):
        return False
    try:
        answers = reader.read(1)
    except h11.RemoteProtocolError:  # closed before an answer
        return False
    return [r.status for r in answers] == [200]


def test_cap_holds_and_idle_connections_make_room(caplog: pytest.LogCaptureFixture) -> None:
    cap = 3
    with serve_in_thread(xor_config(max_connections=cap)) as running, ExitStack() as stack:
        clients: list[tuple[socket.socket, Reader]] = []
        with caplog.at_level(logging.WARNING, logger="webtorch.http"):
            for _ in range(2 * cap):
                # Each new client is served: at the cap, an idle one is closed for it.
                sock = stack.enter_context(connect(running))
                reader = Reader(sock)
                assert served(sock, reader)
                clients.append((sock, reader))
                assert len(server_connections(running)) <= cap
        assert "connection cap reached" in caplog.text
        # The last `cap` clients are the ones open; the earlier ones were closed to make room.
        alive = [served(sock, reader) for sock, reader in clients]
        assert alive == [False] * cap + [True] * cap
        state = running.app.server.state if running.app.server is not None else None
        assert state is not None and state.reclaimed == cap and state.refused == 0
        # Exported (they were only counted): the scrape's own connection reclaims one more.
        samples = metrics(running)
        assert metric(samples, "webtorch_http_connections_reclaimed_total") == cap + 1
        assert metric(samples, "webtorch_http_connections_refused_total") == 0
        assert metric(samples, "webtorch_http_connections_max") == cap


def _receive_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def test_refused_connections_are_counted_in_the_metrics() -> None:
    """Two clients busy sending bodies (each was told 100 Continue, so the server has read
    their heads): the third finds none idle to close and gets a 503; /metrics says so."""
    body = b'{"inputs": [[0, 1]]}'
    head = (
        b"POST /models/xor/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with serve_in_thread(xor_config(max_connections=2)) as running, ExitStack() as stack:
        busy = [stack.enter_context(connect(running)) for _ in range(2)]
        for sock in busy:
            sock.sendall(head)
            assert _receive_head(sock).startswith(b"HTTP/1.1 100 ")
        refused = stack.enter_context(connect(running))
        assert _receive_head(refused).startswith(b"HTTP/1.1 503 ")
        busy[0].sendall(body)  # answered, then idle: the scrape's connection takes its place
        assert b" 200 " in _receive_head(busy[0]).split(b"\r\n", 1)[0]
        samples = metrics(running)
    assert metric(samples, "webtorch_http_connections_refused_total") == 1
    assert metric(samples, "webtorch_http_connections_reclaimed_total") == 1


def test_cap_is_lowered_to_what_the_descriptor_limit_allows() -> None:
    assert connection_cap(4096, 1024) == 768  # a quarter of the descriptors stays free
    assert connection_cap(100, 1024) == 100
    assert connection_cap(4096, 100) == 36  # at least 64 stay free
    assert connection_cap(4096, resource.RLIM_INFINITY) == 4096
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        assert connection_cap(10**9) < soft


def test_running_out_of_descriptors_is_logged_once_a_minute(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = HttpServer(echo, "127.0.0.1", 0, limits=Limits())
    assert server.check_descriptors(0.0)

    def exhausted(*args: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(http_server.os, "open", exhausted)
    with caplog.at_level(logging.ERROR, logger="webtorch.http"):
        assert not server.check_descriptors(100.0)
        assert not server.check_descriptors(101.0)
        assert caplog.text.count("out of file descriptors") == 1
        assert not server.check_descriptors(161.0)
    assert caplog.text.count("out of file descriptors") == 2
