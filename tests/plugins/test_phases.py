"""Each phase on a real server: order across plugins, short-circuit, request and response
bodies, response edits, pick, connect, and log after every kind of ending."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guard.test_bodies import upload
from tests.plugins import record
from tests.plugins.helpers import FIXED, config, metric, request, serving, write_plugins
from tests.proxy.upstreams import pattern_bytes, upstreams

TRACE = """
from pathlib import Path

from tests.plugins.record import note

class Trace:
    def __init__(self):
        self.name = Path(__file__).stem

    def request(self, ctx):
        note((self.name, "request", ctx.path))
        ctx.state.setdefault("seen", []).append(self.name)

    def response(self, ctx, response):
        note((self.name, "response", response.status, list(ctx.state.get("seen", []))))
        response.headers.append((b"x-" + self.name.encode(), b"1"))

    def log(self, ctx):
        note((self.name, "log", ctx.status, ctx.sent, ctx.upstream, ctx.errors))

plugin = Trace()
"""


@pytest.fixture(autouse=True)
def _clear() -> Iterator[None]:
    record.clear()
    yield
    record.clear()


def _logs(n: int) -> list[tuple[object, ...]]:
    events = record.wait_for(lambda e: sum(1 for x in e if x[1] == "log") >= n)
    return [e for e in events if e[1] == "log"]


def test_phases_run_in_order_across_plugins(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"first": TRACE, "second": TRACE})
    # order, not the file's: second (order 1) before first (order 2)
    path = config(
        tmp_path,
        [{"path": "first.py", "order": 2}, {"path": "second.py", "order": 1}],
    )
    with serving(path) as running:
        status, headers, body = request(running, "GET", "/fixed")
        assert (status, body) == (200, b"fixed")
        assert headers["x-first"] == headers["x-second"] == "1"
        _logs(2)
    names = [(e[0], e[1]) for e in record.EVENTS]
    assert names == [
        ("second", "request"),
        ("first", "request"),
        ("second", "response"),
        ("first", "response"),
        ("second", "log"),
        ("first", "log"),
    ]
    # ctx.state went from request to response; the log saw the status and the bytes sent
    assert record.EVENTS[3][3] == ["second", "first"]
    assert record.EVENTS[4][2:4] == (200, 5)


def test_a_shared_response_is_not_edited_for_the_next_request(tmp_path: Path) -> None:
    # A fixed route answers every request with one Response object: the plugin's header is
    # added to a copy, once per response.
    write_plugins(tmp_path, {"only": TRACE})
    with serving(config(tmp_path, [{"path": "only.py"}])) as running:
        for _ in range(3):
            with socket.create_connection((running.host, running.port), timeout=10) as sock:
                sock.sendall(b"GET /fixed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                raw = b""
                while chunk := sock.recv(4096):
                    raw += chunk
            assert raw.count(b"x-only: 1") == 1


SHORT = """
from webtorch.plugins import Response

class Auth:
    def request(self, ctx):
        if ctx.header("x-key") != "sesame":
            return Response(401, b'{"error": "no key"}', headers=[(b"www-authenticate", b"Key")])

plugin = Auth()
"""


def test_request_short_circuits_and_later_phases_still_run(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"auth": SHORT, "trace": TRACE})
    with upstreams("a") as (up,):
        path = config(
            tmp_path,
            [{"path": "auth.py"}, {"path": "trace.py"}],
            routes=[{"prefix": "/", "upstream": "backend"}],
            upstreams={"backend": [up.address]},
        )
        with serving(path) as running:
            status, headers, body = request(running, "GET", "/x")
            assert status == 401 and body == b'{"error": "no key"}'
            assert headers["www-authenticate"] == "Key"
            assert headers["x-trace"] == "1"  # response phases run on a short-circuit too
            assert up.hits["/x"] == 0
            status, headers, _ = request(running, "GET", "/x", headers={"x-key": "sesame"})
            assert status == 200 and headers["x-upstream"] == "a"
            logs = _logs(2)
    # the later plugin's request phase did not run for the refused request
    requests = [e for e in record.EVENTS if e[1] == "request"]
    assert len(requests) == 1
    assert [e[2] for e in logs] == [401, 200]
    assert logs[1][4] == up.address  # log sees the upstream


ASYNC = """
import asyncio

class Slow:
    async def request(self, ctx):
        await asyncio.sleep(0)  # a real wait: the request runs as a task
        ctx.state["waited"] = True

    def response(self, ctx, response):
        response.headers.append((b"x-waited", str(ctx.state.get("waited")).encode()))

plugin = Slow()
"""


def test_async_request_phase(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"slow": ASYNC})
    with serving(config(tmp_path, [{"path": "slow.py"}])) as running:
        status, headers, body = request(running, "GET", "/fixed")
    assert (status, body, headers["x-waited"]) == (200, b"fixed", "True")


BODY = """
from tests.plugins.record import note
from webtorch.plugins import Response

class Body:
    def request_body(self, ctx, body):
        note(("body", len(body)))
        if body.startswith(b"refuse"):
            return Response(422, b"refused by body")
        return body.upper()

plugin = Body()
"""

STREAM = """
from tests.plugins.record import note

class Count:
    def request_body(self, ctx, chunk, end):
        ctx.state["n"] = ctx.state.get("n", 0) + len(chunk)
        if end:
            note(("streamed", ctx.state["n"]))

plugin = Count()
"""


def test_request_body_buffered_replaced_refused_and_limited(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"body": BODY})
    with upstreams("a") as (up,):
        path = config(
            tmp_path,
            [{"path": "body.py", "body_limit": 1000}],
            routes=[{"prefix": "/", "upstream": "backend"}],
            upstreams={"backend": [up.address]},
        )
        with serving(path) as running:
            # a streamed (proxied) body read whole for the plugin, then sent as it returned it
            status, _, body = request(running, "POST", "/echo", body=b"hello")
            assert status == 200
            echoed = json.loads(body)
            assert echoed["body_bytes"] == 5
            assert echoed["sha256"] == hashlib.sha256(b"HELLO").hexdigest()
            # chunked: read whole, then sent on with a Content-Length
            with socket.create_connection((running.host, running.port), timeout=10) as sock:
                sock.sendall(
                    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                    b"Connection: close\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n"
                )
                raw = b""
                while chunk := sock.recv(65536):
                    raw += chunk
            assert raw.startswith(b"HTTP/1.1 200")
            echoed = json.loads(raw.split(b"\r\n\r\n", 1)[1])
            assert echoed["sha256"] == hashlib.sha256(b"HELLO").hexdigest()
            assert ["content-length", "5"] in echoed["headers"]
            status, _, body = request(running, "POST", "/echo", body=b"refuse this")
            assert (status, body) == (422, b"refused by body")
            status, _, body = request(running, "POST", "/echo", body=b"x" * 5000)
            assert status == 413 and b"'body'" in body and b"body_limit" in body
    assert ("body", 5) in record.EVENTS


def test_request_body_streamed_chunks(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"count": STREAM})
    with upstreams("a") as (up,):
        path = config(
            tmp_path,
            [{"path": "count.py", "body": "stream"}],
            routes=[{"prefix": "/", "upstream": "backend"}],
            upstreams={"backend": [up.address]},
        )
        with serving(path) as running:
            data = pattern_bytes(300_000)
            status, _, _ = request(running, "POST", "/echo", body=data)
            assert status == 200
            record.wait_for(lambda e: ("streamed", 300_000) in e)


SCAN = """
from tests.plugins.record import note
from webtorch.plugins import Response

class Scan:
    def request_body(self, ctx, chunk, end):
        if b"VIRUS" in chunk:
            note(("refused", len(chunk)))
            return Response(403, b"infected")

plugin = Scan()
"""


def test_a_stream_plugin_stops_an_upload_mid_body(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"scan": SCAN})
    head = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    padding = [b"x" * 20_000] * 3
    with upstreams("a") as (up,):
        path = config(
            tmp_path,
            [{"path": "scan.py", "body": "stream"}],
            routes=[FIXED, {"prefix": "/", "upstream": "backend"}],
            upstreams={"backend": [up.address]},
        )
        with serving(path) as running:
            # the upstream has the request and the padding when the bad chunk comes
            started = functools.partial(up.wait_for_hits, "/echo", 1)
            answer = upload(running, head, padding, [b"..VIRUS.."], started)
            assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
            assert b"infected" in answer
            assert up.wait_disconnects(1)  # abandoned mid-body: never whole upstream
            # a clean upload goes through whole
            answer = upload(running, head, [*padding, b"clean"])
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            # with a Content-Length, the same
            status, _, body = request(running, "POST", "/echo", body=b"a VIRUS")
            assert (status, body) == (403, b"infected")
            # a route that reads bodies whole: the body is one chunk, with end
            status, _, body = request(running, "POST", "/fixed", body=b"a VIRUS")
            assert (status, body) == (403, b"infected")
            assert request(running, "POST", "/fixed", body=b"fine")[0] == 200


REDACT = """
class Shout:
    def response_body(self, ctx, chunk, end):
        return chunk.replace(b"\\x00", b"") + (b"!" if end else b"")

plugin = Shout()
"""


def test_response_body_buffered_and_streamed(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"shout": REDACT})
    with upstreams("a") as (up,):
        path = config(
            tmp_path,
            [{"path": "shout.py"}],
            routes=[FIXED, {"prefix": "/", "upstream": "backend"}],
            upstreams={"backend": [up.address]},
        )
        with serving(path) as running:
            status, headers, body = request(running, "GET", "/fixed")
            assert (status, body, headers["content-length"]) == (200, b"fixed!", "6")
            # a large proxied body streams through the filter, chunk by chunk
            n = 500_000
            status, headers, body = request(running, "GET", f"/bytes?n={n}")
            expected = pattern_bytes(n).replace(b"\x00", b"") + b"!"
            assert status == 200 and body == expected
            assert "content-length" not in headers  # its length changed: chunked


PICK = """
class Steer:
    def pick(self, ctx, candidates):
        wanted = ctx.header("x-pool")
        if wanted == "none":
            return []
        for upstream in candidates:
            if wanted and upstream.address.endswith(":" + wanted):
                return upstream
        avoid = ctx.header("x-avoid")
        if avoid == "wrong":
            return "not an upstream"
        return [u for u in candidates if not (avoid and u.address.endswith(":" + avoid))]

plugin = Steer()
"""


def test_pick_chooses_and_vetoes(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"steer": PICK})
    with upstreams("a", "b") as (a, b):
        path = config(
            tmp_path,
            [{"path": "steer.py"}],
            routes=[{"prefix": "/", "upstream": "backend"}],
            upstreams={"backend": [a.address, b.address]},
        )
        with serving(path) as running:
            for _ in range(4):
                _, headers, _ = request(running, "GET", "/", headers={"x-pool": str(b.port)})
                assert headers["x-upstream"] == "b"
            for _ in range(4):  # a veto: the policy (round robin) chooses among those left
                _, headers, _ = request(running, "GET", "/", headers={"x-avoid": str(a.port)})
                assert headers["x-upstream"] == "b"
            status, _, body = request(running, "GET", "/", headers={"x-pool": "none"})
            assert status == 503 and b"plugins left no upstream" in body
            # a wrong answer is a failure of the plugin (open: the policy chooses)
            assert request(running, "GET", "/", headers={"x-avoid": "wrong"})[0] == 200
            calls = 'webtorch_plugin_calls_total{phase="pick",plugin="steer"}'
            assert metric(running, calls) == 10
            errors = 'webtorch_plugin_errors_total{phase="pick",plugin="steer"}'
            assert metric(running, errors) == 1


CONNECT = """
class Door:
    def startup(self, host):
        self.refused = set(host.settings["refuse"])

    def connect(self, address):
        return address not in self.refused

plugin = Door()
"""


def test_connect_refuses_by_address(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"door": CONNECT})
    path = config(tmp_path, [{"path": "door.py", "settings": {"refuse": ["127.0.0.1"]}}])
    with serving(path) as running:
        with socket.create_connection((running.host, running.port), timeout=10) as sock:
            sock.sendall(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                data = sock.recv(100)
            except ConnectionResetError:
                data = b""
        assert data == b""  # closed before a byte was read


def test_connect_admits_others(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"door": CONNECT})
    path = config(tmp_path, [{"path": "door.py", "settings": {"refuse": ["10.9.9.9"]}}])
    with serving(path) as running:
        assert request(running, "GET", "/fixed")[0] == 200


def test_log_runs_after_errors_and_refusals(tmp_path: Path, refused_address: str) -> None:
    write_plugins(tmp_path, {"trace": TRACE})
    path = config(
        tmp_path,
        [{"path": "trace.py"}],
        routes=[FIXED, {"prefix": "/up", "upstream": "backend"}],
        upstreams={"backend": [refused_address]},
    )
    with serving(path) as running:
        assert request(running, "GET", "/nowhere")[0] == 404
        assert request(running, "GET", "/up")[0] == 502
        # refused while being read (no plugin saw its request phase): logged all the same
        with socket.create_connection((running.host, running.port), timeout=10) as sock:
            sock.sendall(b"GET /fixed HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
        logs = _logs(3)
    assert [e[2] for e in logs] == [404, 502, 400]
    assert logs[1][4] == refused_address


def test_a_plugin_sees_only_its_routes(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"trace": TRACE})
    path = config(
        tmp_path,
        [{"path": "trace.py", "routes": ["/fixed"]}],
        routes=[FIXED, {"path": "/other", "return": 204}],
    )
    with serving(path) as running:
        _, headers, _ = request(running, "GET", "/other")
        assert "x-trace" not in headers
        _, headers, _ = request(running, "GET", "/fixed")
        assert headers["x-trace"] == "1"
    assert [e[2] for e in record.EVENTS if e[1] == "request"] == ["/fixed"]


LIFE = """
from tests.plugins.record import note
from webtorch.plugins import every

class Life:
    def startup(self, host):
        note(("startup", host.name, dict(host.settings)))
        self.ticks = 0

    @every(0.01)
    def tick(self):
        self.ticks += 1
        note(("tick", self.ticks))

    @every(0.01)
    async def broken(self):
        raise RuntimeError("periodic failure")

    async def shutdown(self):
        note(("shutdown",))

plugin = Life()
"""


def test_startup_periodic_work_and_shutdown(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"life": LIFE})
    path = config(tmp_path, [{"path": "life.py", "settings": {"a": 1}}])
    with serving(path) as running:
        record.wait_for(lambda e: ("tick", 3) in e)
        errors = 'webtorch_plugin_errors_total{phase="every:broken",plugin="life"}'
        record.wait_for(lambda e: metric(running, errors) >= 1)
        assert request(running, "GET", "/fixed")[0] == 200  # failing periodic work harms none
    assert record.EVENTS[0] == ("startup", "life", {"a": 1})
    assert record.EVENTS[-1] == ("shutdown",)


COUNTER = """
from tests.plugins.record import note

class Count:
    def __init__(self):
        self.open = 0

    def connect(self, address):
        self.open += 1
        note(("open", self.open))

    def disconnect(self, address):
        self.open -= 1
        note(("open", self.open))

plugin = Count()
"""

REFUSE_ALL = """
class No:
    def connect(self, address):
        return False

plugin = No()
"""


def test_disconnect_balances_connect_even_when_a_later_plugin_refuses(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"count": COUNTER, "no": REFUSE_ALL})
    path = config(tmp_path, [{"path": "count.py", "order": 1}, {"path": "no.py", "order": 2}])
    with serving(path) as running:
        with socket.create_connection((running.host, running.port), timeout=10) as sock:
            sock.sendall(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        record.wait_for(lambda e: e[-2:] == [("open", 1), ("open", 0)])


def test_disconnect_when_the_connection_ends(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"count": COUNTER})
    with serving(config(tmp_path, [{"path": "count.py"}])) as running:
        assert request(running, "GET", "/fixed")[0] == 200  # its connection closes after
        record.wait_for(lambda e: e == [("open", 1), ("open", 0)])


WRAP = """
from tests.plugins.record import note

class Wrap:
    def pick(self, ctx, candidates):
        first = ctx.policy(candidates)  # what the configured policy would do
        note(("policy", first.address))
        if ctx.header("x-second-opinion") and len(candidates) > 1:
            return ctx.policy([u for u in candidates if u is not first])
        return first

plugin = Wrap()
"""


def test_pick_wraps_the_configured_policy(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"wrap": WRAP})
    with upstreams("a", "b") as (a, b):
        path = config(
            tmp_path,
            [{"path": "wrap.py"}],
            routes=[{"prefix": "/", "upstream": "backend"}],
            upstreams={"backend": [a.address, b.address]},
        )
        with serving(path) as running:
            # round robin, as configured (the default policy), through the plugin
            served = [request(running, "GET", "/")[1]["x-upstream"] for _ in range(4)]
            assert sorted(served) == ["a", "a", "b", "b"]
            # the plugin overrides it: never the policy's first choice
            for _ in range(4):
                headers = request(running, "GET", "/", headers={"x-second-opinion": "1"})[1]
                chosen = {a.address: "a", b.address: "b"}
                first = record.EVENTS[-1][1]
                assert headers["x-upstream"] != chosen[first]
