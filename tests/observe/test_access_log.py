"""The access log: its lines for model, fixed and refused requests, sampling, the bounded queue,
reopening on SIGUSR1 (against a real ``webtorch serve``), its metrics, and request ids at the
protocol (the proxy's side is in tests/proxy/test_request_ids.py)."""

from __future__ import annotations

import asyncio
import io
import os
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import XOR, serve_in_thread, serve_process
from tests.http.test_protocol import Conn, echo, parse_responses, req, settle
from tests.proxy.test_forward import request
from webtorch import config as wt_config
from webtorch.http.messages import Request
from webtorch.http.state import ServerState
from webtorch.observe.access_log import KEYS, AccessLog, redact_query

GENERATED_ID = re.compile(r"[0-9a-f]{32}")
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met before the deadline")
        time.sleep(0.01)


def logged_config(tmp_path: Path, **access_log: Any) -> wt_config.Config:
    return wt_config.from_dict(
        {
            "server": {"access_log": {"path": "access.log", **access_log}},
            "models": {"xor": {"path": str(XOR)}},
            "routes": [
                {"path": "/hello", "return": 200, "body": "hi"},
                {"path": "/down", "return": 503, "body": "down"},
            ],
        },
        base_dir=tmp_path,  # the relative path resolves here, as a file's directory
    )


# -- lines from a running server --------------------------------------------------------------


def test_model_fixed_and_refused_requests_are_logged(tmp_path: Path) -> None:
    with serve_in_thread(logged_config(tmp_path)) as running:
        status, headers, body = request(
            running,
            "POST",
            "/models/xor/predict?debug=1",
            b'{"inputs": [[0, 1]]}',
            {"Content-Type": "application/json"},
        )
        assert status == 200
        model_id = headers["x-request-id"]
        status, headers, _ = request(running, "GET", "/hello", headers={"X-Request-Id": "abc-1"})
        assert status == 200 and headers["x-request-id"] == "abc-1"
        status, head_headers, _ = request(running, "HEAD", "/hello")
        # A request refused while parsed (431) is logged too, with what was known of it.
        big = b"GET /refused HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
        refused = parse_responses(exchange(running.host, running.port, big), eof=True)[0]
        assert refused.status == 431
        assert GENERATED_ID.fullmatch(refused.headers[b"x-request-id"].decode())
    lines = read_lines(tmp_path / "access.log")  # stopping the server wrote every line
    assert len(lines) == 4
    for line in lines:
        assert tuple(line) == KEYS
        assert ISO_UTC.fullmatch(line["time"])
        assert line["client"] == "127.0.0.1"
        assert line["guard_score"] is None and line["guard_action"] is None
    model, fixed, head, refused_line = lines
    assert model["request_id"] == model_id and GENERATED_ID.fullmatch(model_id)
    assert model["method"] == "POST"
    assert model["path"] == "/models/xor/predict"
    assert model["query"] == "debug=1"
    assert model["status"] == 200
    assert model["bytes"] == len(body)
    assert model["route"] == "/models/xor/predict"
    assert model["model"] == "xor"
    assert model["upstream"] is None and model["reason"] is None
    assert model["retries"] == 0
    assert 0 < model["duration"] < 10
    assert fixed["request_id"] == "abc-1"
    assert (fixed["path"], fixed["query"]) == ("/hello", None)
    assert (fixed["status"], fixed["bytes"]) == (200, 2)
    assert fixed["route"] == "/hello" and fixed["model"] is None
    assert head["method"] == "HEAD" and head["bytes"] == 0  # nothing of the body was sent
    assert head["request_id"] == head_headers["x-request-id"]
    assert refused_line["status"] == 431
    assert (refused_line["method"], refused_line["path"]) == ("GET", "/refused")
    assert refused_line["request_id"] == refused.headers[b"x-request-id"].decode()
    assert refused_line["bytes"] == len(refused.body)


def test_metrics_count_written_and_dropped_lines(tmp_path: Path) -> None:
    with serve_in_thread(logged_config(tmp_path)) as running:
        request(running, "GET", "/hello")
        assert running.app.access_log is not None
        wait_for(lambda: running.app.access_log is not None and running.app.access_log.lines >= 1)
        _, _, scrape = request(running, "GET", "/metrics")
    text = scrape.decode()
    assert "webtorch_access_log_lines_total 1.0" in text
    assert 'webtorch_access_log_dropped_total{reason="buffer_full"} 0.0' in text
    assert 'webtorch_access_log_dropped_total{reason="write_error"} 0.0' in text


def test_no_access_log_and_no_request_ids_by_config(tmp_path: Path) -> None:
    cfg = wt_config.from_dict(
        {
            "server": {"request_id": False},
            "routes": [{"path": "/hello", "return": 200, "body": "hi"}],
        }
    )
    with serve_in_thread(cfg) as running:
        assert running.app.access_log is None
        assert running.app.server is not None
        assert running.app.server.state.access_log is None
        status, headers, _ = request(running, "GET", "/hello", headers={"X-Request-Id": "abc"})
        assert status == 200 and "x-request-id" not in headers


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    for bad, key in (
        ({"path": "a.log", "sample": 0}, "server.access_log.sample"),
        ({"path": "a.log", "sample": 1.5}, "server.access_log.sample"),
        ({"path": "a.log", "buffer": 0}, "server.access_log.buffer"),
        ({"sample": 0.5}, "server.access_log.path"),
        ({"path": "a.log", "rotate": True}, "server.access_log.rotate"),
    ):
        with pytest.raises(wt_config.ConfigError, match=re.escape(key)):
            wt_config.from_dict({"server": {"access_log": bad}})
    cfg = wt_config.from_dict({"server": {"access_log": {"path": "-"}}})
    assert cfg.access_log_path() is None  # standard output
    cfg = wt_config.from_dict({"server": {"access_log": {"path": "logs/a.log"}}}, base_dir=tmp_path)
    assert cfg.access_log_path() == tmp_path / "logs" / "a.log"


# -- the writer, without a server ---------------------------------------------------------------


def a_request(path: str = "/x", query: str = "") -> Request:
    return Request("GET", path, query, [], b"", client="10.0.0.1", route="/x", request_id=b"rid")


def test_sampling_keeps_the_drawn_share_and_every_server_error() -> None:
    stream = io.BytesIO()
    access_log = AccessLog(None, sample=0.25, rng=random.Random(7), stream=stream)
    access_log.open()
    statuses = [503 if i % 10 == 0 else 200 for i in range(1000)]
    for i, status in enumerate(statuses):
        access_log.record(a_request(f"/r{i}"), status, 0, 0.001)
    access_log.close()
    logged = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    # The same draws, replayed: one per non-5xx answer, kept below the sample rate.
    replay = random.Random(7)
    expected = [
        f"/r{i}" for i, status in enumerate(statuses) if status >= 500 or replay.random() < 0.25
    ]
    assert [line["path"] for line in logged] == expected
    assert sum(line["status"] == 503 for line in logged) == 100  # every one of them
    assert 150 < len(logged) - 100 < 300  # about a quarter of the other 900


class StuckDisk(io.BytesIO):
    """A stream whose writes wait until released: a disk that has stopped answering."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, data: Any) -> int:
        self.entered.set()
        assert self.release.wait(30)
        return super().write(data)


def test_a_full_buffer_drops_and_counts_lines_and_never_blocks() -> None:
    disk = StuckDisk()
    access_log = AccessLog(None, buffer=100, interval=0.01, stream=disk)
    access_log.open()
    access_log.record(a_request(), 200, 0, 0.001)
    assert disk.entered.wait(10)  # the writer took that line and is stuck writing it
    # Should record() ever wait for the writer, this releases it, and the check below fails.
    watchdog = threading.Timer(20, disk.release.set)
    watchdog.start()
    try:
        for _ in range(150):
            access_log.record(a_request(), 200, 0, 0.001)
        assert not disk.release.is_set()  # all 150 calls returned while the disk was stuck
        assert access_log.dropped == 50  # 100 queued, the rest dropped
    finally:
        watchdog.cancel()
        disk.release.set()
    access_log.close()
    assert len(disk.getvalue().splitlines()) == 101
    assert (access_log.lines, access_log.dropped, access_log.failed) == (101, 50, 0)


def test_failed_writes_are_counted_as_lost(tmp_path: Path) -> None:
    class Broken(io.BytesIO):
        def write(self, data: Any) -> int:
            raise OSError(28, "No space left on device")

    access_log = AccessLog(None, stream=Broken())
    access_log.open()
    for _ in range(3):
        access_log.record(a_request(), 200, 0, 0.001)
    access_log.close()
    assert (access_log.lines, access_log.failed) == (0, 3)


def test_the_file_is_created_0640_and_secret_query_values_are_redacted(tmp_path: Path) -> None:
    """Issue 19's siblings of items 4 and 7: the log is the admins' to read (0640 like nginx's,
    its new directories 0750; it was 0644), and a credential in a query is not kept in it."""
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "logs" / "access.log"
        access_log = AccessLog(path, interval=0.01)
        access_log.open()
    finally:
        os.umask(old_umask)
    query = "q=1&api_key=abc123&Access_Token=xyz&X-Amz-Signature=s1&password=&page=2"
    access_log.record(a_request("/p", query), 200, 0, 0.001)
    access_log.close()
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o640, 0o750)
    [line] = read_lines(path)
    assert line["query"] == (
        "q=1&api_key=REDACTED&Access_Token=REDACTED&X-Amz-Signature=REDACTED"
        "&password=REDACTED&page=2"
    )
    assert b"abc123" not in path.read_bytes() and b"xyz" not in path.read_bytes()


def test_only_credential_words_are_redacted() -> None:
    query = "keyword=shoes&monkey=1&design=a&apiKey=k&sessionId=s&user[password]=p&sig=x"
    assert redact_query(query) == (
        "keyword=shoes&monkey=1&design=a&apiKey=REDACTED&sessionId=REDACTED"
        "&user[password]=REDACTED&sig=REDACTED"
    )


def test_reopen_starts_a_new_file_at_the_path(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access_log = AccessLog(path, interval=0.01)
    access_log.open()
    access_log.record(a_request("/before"), 200, 0, 0.001)
    wait_for(lambda: path.exists() and path.read_bytes().count(b"\n") == 1)
    path.rename(tmp_path / "access.log.1")
    access_log.reopen()
    wait_for(path.exists)  # reopened: the new file is there before any new line
    access_log.record(a_request("/after"), 200, 0, 0.001)
    access_log.close()
    assert [line["path"] for line in read_lines(tmp_path / "access.log.1")] == ["/before"]
    assert [line["path"] for line in read_lines(path)] == ["/after"]


def test_sigusr1_reopens_the_log_of_a_running_server(tmp_path: Path) -> None:
    config = tmp_path / "webtorch.toml"
    config.write_text(
        '[server]\nlisten = "127.0.0.1:8080"\n\n'
        '[server.access_log]\npath = "logs/access.log"\n\n'  # relative to this file
        '[[routes]]\npath = "/hello"\nreturn = 200\nbody = "hi"\n'
    )
    log = tmp_path / "logs" / "access.log"
    rotated = tmp_path / "logs" / "access.log.1"
    with serve_process(config) as proc:
        host_port = proc.url.removeprefix("http://")
        status = _get(host_port, "/hello?n=1")
        assert status == 200
        wait_for(lambda: log.exists() and log.read_bytes().count(b"\n") == 1)
        log.rename(rotated)  # what logrotate does, then it signals the server
        proc.send(signal.SIGUSR1)
        wait_for(log.exists)
        assert _get(host_port, "/hello?n=2") == 200
        wait_for(lambda: log.read_bytes().count(b"\n") == 1)
        assert proc.stop().returncode == 0
    assert [line["query"] for line in read_lines(rotated)] == ["n=1"]
    assert [line["query"] for line in read_lines(log)] == ["n=2"]


def _get(host_port: str, target: str) -> int:
    host, port = host_port.rsplit(":", 1)
    raw = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    return parse_responses(exchange(host, int(port), raw), eof=True)[0].status


def exchange(host: str, port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes."""
    received = b""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            received += chunk
    return received


# -- request ids at the protocol ----------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_ids_are_generated_kept_or_replaced(loop: asyncio.AbstractEventLoop) -> None:
    seen: list[bytes] = []

    def handler(request: Request) -> Any:
        seen.append(request.request_id)
        return echo(request)

    conn = Conn(ServerState(handler, request_ids=True), loop)
    good = "Root=1-5f84c7a5-a1b2/c3+d4=:x@y"  # token, base64 and URN characters
    conn.send(
        req("GET", "/a")
        + req("GET", "/b", [("X-Request-Id", good)])
        + req("GET", "/c", [("X-Request-Id", "has space")])
        + req("GET", "/d", [("X-Request-Id", "x" * 129)])
        + req("GET", "/e", [("X-Request-Id", '"quoted"')])
        + req("GET", "/f", [("X-Request-Id", "first"), ("X-Request-Id", "second")])
    )
    settle(loop)
    ids = [r.headers[b"x-request-id"].decode() for r in conn.responses()]
    assert [s.decode() for s in seen] == ids  # the handler saw the id the client gets
    assert GENERATED_ID.fullmatch(ids[0])
    assert ids[1] == good
    assert all(GENERATED_ID.fullmatch(i) for i in ids[2:5])  # replaced
    assert ids[5] == "first"
    generated = [ids[0], *ids[2:5]]
    assert len(set(generated)) == 4
    assert len({i[:16] for i in generated}) == 1  # one server prefix, then a counter


def test_protocol_errors_carry_an_id_too(loop: asyncio.AbstractEventLoop) -> None:
    logged: list[tuple[str, str, int, bytes]] = []

    def access_log(request: Request, status: int, sent: int, seconds: float) -> None:
        logged.append((request.method, request.path, status, request.request_id))

    conn = Conn(ServerState(echo, request_ids=True, access_log=access_log), loop)
    conn.send(b"BROKEN\x01 / HTTP/1.1\r\n\r\n")
    settle(loop)
    (response,) = conn.responses()
    assert response.status == 400
    rid = response.headers[b"x-request-id"]
    assert GENERATED_ID.fullmatch(rid.decode())
    assert logged == [("", "", 400, rid)]  # nothing of the request could be read


def test_ids_off_add_nothing(loop: asyncio.AbstractEventLoop) -> None:
    logged: list[bytes] = []

    def access_log(request: Request, status: int, sent: int, seconds: float) -> None:
        logged.append(request.request_id)

    conn = Conn(ServerState(echo, access_log=access_log), loop)
    conn.send(req("GET", "/a", [("X-Request-Id", "abc")]))
    settle(loop)
    (response,) = conn.responses()
    assert b"x-request-id" not in response.headers
    assert logged == [b""]
