"""WebSocket through the proxy (streams/tunnel.py): a route with ``websocket = true`` pipes an
upgrade to an upstream its group picks (hashing and sticky included), both ways, counted in
/metrics and the access log; an upstream that refuses or is down is answered as HTTP."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.sync.server import Server, ServerConnection, serve

from tests.conftest import serve_in_thread
from tests.streams.conftest import on_loop, ws_url
from webtorch import config as wt_config


@contextmanager
def echo_upstream(name: str) -> Iterator[tuple[str, Server]]:
    """A WebSocket echo server (the websockets package) in a thread: each message comes back
    as ``NAME:message``; the request's X-Forwarded-For is sent first."""

    def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        ws.send(json.dumps({"forwarded_for": ws.request.headers.get("x-forwarded-for")}))
        for message in ws:
            ws.send(f"{name}:{message}")

    server = serve(handler, "127.0.0.1", 0, compression=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.socket.getsockname()[:2]
        yield f"{host}:{port}", server
    finally:
        server.shutdown()
        thread.join(10)


def proxy_config(servers: list[str], log: Path | None = None, **upstream: Any) -> wt_config.Config:
    data: dict[str, Any] = {
        "upstreams": {"ws": {"servers": [{"address": a} for a in servers], **upstream}},
        "routes": [{"prefix": "/ws/", "upstream": "ws", "websocket": True}],
        "streams": {},
    }
    if log is not None:
        data["server"] = {"access_log": {"path": str(log)}}
    return wt_config.from_dict(data)


def test_a_websocket_is_piped_to_the_upstream_and_back(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    with (
        echo_upstream("a") as (address, _),
        serve_in_thread(proxy_config([address], log)) as running,
    ):
        with connect(ws_url(running, "/ws/chat?room=1")) as ws:
            assert json.loads(ws.recv(timeout=10))["forwarded_for"] == "127.0.0.1"
            for i in range(50):
                ws.send(f"m{i}")
            assert [ws.recv(timeout=10) for _ in range(50)] == [f"a:m{i}" for i in range(50)]
            big = "z" * 300_000  # many reads and writes each way
            ws.send(big)
            assert ws.recv(timeout=10) == "a:" + big
            assert ws.ping().wait(10)  # control frames pass through too
        metrics = httpx.get(running.url + "/metrics").text
        assert "webtorch_websocket_proxied_total 1.0" in metrics
        streams = running.app.streams
        assert streams is not None and streams.tunnels is not None
        stats = streams.tunnels.stats
        up, down = on_loop(running, lambda: (stats.bytes_up, stats.bytes_down))
        assert up > 300_000 and down > 300_000
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    (line,) = [entry for entry in lines if entry.get("path") == "/ws/chat"]
    assert line["status"] == 101 and line["upstream"] == address
    assert line["bytes"] > 300_000 and line["duration"] > 0


def test_the_route_policy_picks_the_upstream() -> None:
    with echo_upstream("a") as (a, _), echo_upstream("b") as (b, _):
        cfg = proxy_config([a, b], policy="hash", hash_key="query:user")
        with serve_in_thread(cfg) as running:
            seen = {}
            # The ring depends on the upstreams' (random) ports: 16 keys all on one upstream
            # would be a 1-in-32,768 chance.
            for user in [f"u{i}" for i in range(16)]:
                names = set()
                for _ in range(2):  # the same key: the same upstream, every time
                    with connect(ws_url(running, f"/ws/x?user={user}")) as ws:
                        ws.recv(timeout=10)
                        ws.send("hi")
                        names.add(ws.recv(timeout=10).split(":")[0])
                assert len(names) == 1
                seen[user] = names.pop()
            assert set(seen.values()) == {"a", "b"}  # and the keys spread


def test_an_upstream_that_is_down_or_refuses_is_answered_as_http(refused_address: str) -> None:
    with serve_in_thread(proxy_config([refused_address])) as running:
        with pytest.raises(InvalidStatus) as info:
            connect(ws_url(running, "/ws/x"))
        assert info.value.response.status_code == 502
    # A plain HTTP upstream answers the upgrade as a plain request: the client gets that.
    from tests.proxy.upstreams import upstreams

    with upstreams("plain") as (up,), serve_in_thread(proxy_config([up.address])) as running:
        with pytest.raises(InvalidStatus) as info:
            connect(ws_url(running, "/ws/x"))
        assert info.value.response.status_code == 200
        assert info.value.response.body == b"plain"
        # Plain requests on the route are still proxied as before.
        assert httpx.get(running.url + "/ws/anything").status_code == 200


def test_a_route_without_websocket_answers_upgrades_as_plain_http() -> None:
    with echo_upstream("a") as (address, _):
        data: dict[str, Any] = {
            "upstreams": {"ws": {"servers": [{"address": address}]}},
            "routes": [{"prefix": "/ws/", "upstream": "ws"}],
            "streams": {},
        }
        with serve_in_thread(wt_config.from_dict(data)) as running, pytest.raises(InvalidStatus):
            connect(ws_url(running, "/ws/x"))


def test_a_client_that_does_not_read_pauses_the_upstream() -> None:
    """Backpressure through a tunnel: an upstream that floods a client who does not read gets
    its reading paused (the client side's write buffer above its mark), so what the proxy holds
    stays bounded; when the client reads, every message arrives, in order."""
    count, size = 300, 65536

    def flood(ws: ServerConnection) -> None:
        for i in range(count):
            ws.send(f"{i:08d}" + "x" * (size - 8))
        ws.recv()  # until the client closes

    server = serve(flood, "127.0.0.1", 0, compression=None, max_size=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.socket.getsockname()[:2]
    try:
        cfg = proxy_config([f"{host}:{port}"])
        with serve_in_thread(cfg) as running:
            streams = running.app.streams
            assert streams is not None
            raw = socket.create_connection((running.host, running.port), timeout=30)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            raw.sendall(
                b"GET /ws/flood HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )

            def state() -> tuple[int, bool]:
                (tunnel,) = streams.hub.open
                if tunnel.client is None or tunnel.upstream is None:
                    return 0, True  # still connecting
                return tunnel.client.get_write_buffer_size(), tunnel.upstream.is_reading()

            # Not reading: the proxy stops reading the upstream once its buffer is full.
            for _ in range(100_000):
                buffered, reading = on_loop(running, state)
                if not reading:
                    break
            assert not reading
            # Above the mark, no more is read from the upstream: what is held is the mark plus
            # the one read (uvloop reads up to 256 KiB) that crossed it.
            limit = streams.hub.settings.write_buffer
            assert buffered <= limit + 256 * 1024
            # Now read everything: 300 messages of 64 KiB, in order.
            from tests.streams.test_websocket import _frame

            head = b""
            while b"\r\n\r\n" not in head:
                head += raw.recv(1)
            assert head.startswith(b"HTTP/1.1 101")
            for i in range(count):
                opcode, payload = _frame(raw)
                assert opcode == 0x1 and payload[:8] == b"%08d" % i
            raw.close()
    finally:
        server.shutdown()
        thread.join(10)


def test_a_sticky_group_pins_a_websocket_client_by_its_cookie() -> None:
    with echo_upstream("a") as (a, _), echo_upstream("b") as (b, _):
        cfg = proxy_config([a, b], sticky={"cookie": "route"})
        with serve_in_thread(cfg) as running:
            with connect(ws_url(running, "/ws/x")) as ws:
                ws.recv(timeout=10)
                assert ws.response is not None
                cookie = ws.response.headers["set-cookie"].split(";")[0]
                ws.send("hi")
                first = ws.recv(timeout=10).split(":")[0]
            for _ in range(4):  # round robin would alternate; the cookie holds
                with connect(ws_url(running, "/ws/x"), additional_headers={"Cookie": cookie}) as ws:
                    ws.recv(timeout=10)
                    assert ws.response is not None and "set-cookie" not in ws.response.headers
                    ws.send("hi")
                    assert ws.recv(timeout=10).split(":")[0] == first


def test_least_conn_counts_open_websockets() -> None:
    with (
        echo_upstream("a") as (a, _),
        echo_upstream("b") as (b, _),
        serve_in_thread(proxy_config([a, b], policy="least_conn")) as running,
        ExitStack() as stack,
    ):
        names = []
        # All six open at once: each pick sees the ones already open.
        sockets = [stack.enter_context(connect(ws_url(running, "/ws/x"))) for _ in range(6)]
        for ws in sockets:
            ws.recv(timeout=10)
            ws.send("hi")
            names.append(ws.recv(timeout=10).split(":")[0])
        assert sorted(names) == ["a", "a", "a", "b", "b", "b"]


def test_an_upstream_that_fails_an_opening_leaves_rotation(refused_address: str) -> None:
    """A tunnel's opening counts in passive health as a proxied request does: an upstream that
    refuses the connection is out of rotation after max_fails (1), so the next WebSockets all
    reach the live one instead of every other one failing with 502."""
    with (
        echo_upstream("a") as (address, _),
        serve_in_thread(
            proxy_config([refused_address, address], max_fails=1, fail_timeout=60)
        ) as running,
    ):
        failed = 0
        for _ in range(6):
            try:
                with connect(ws_url(running, "/ws/x")) as ws:
                    ws.recv(timeout=10)  # the echo server's greeting
                    ws.send("hi")
                    assert ws.recv(timeout=10) == "a:hi"
            except InvalidStatus as exc:
                assert exc.response.status_code == 502
                failed += 1
        assert failed <= 1
