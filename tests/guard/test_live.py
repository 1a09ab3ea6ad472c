"""The guard enforcing on a live server: real sockets, the shipped detector, the real handler."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import XOR, Running, serve_in_thread
from tests.proxy.test_forward import request
from webtorch import config as wt_config
from webtorch.guard.clients import shown_client

PREDICT = b'{"inputs": [[0, 1]]}'
BROWSER = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
    "Accept": "application/json",
    "Accept-Language": "en-US,en;q=0.9",
}


def guarded(**guard: Any) -> wt_config.Config:
    return wt_config.from_dict({"models": {"xor": {"path": str(XOR)}}, "guard": guard})


def predict(running: Running, query: str = "") -> tuple[int, dict[str, str], Any]:
    target = "/models/xor/predict" + (f"?{query}" if query else "")
    status, headers, body = request(running, "POST", target, PREDICT, headers=BROWSER)
    return status, headers, json.loads(body)


def test_enforce_blocks_injection_and_serves_everyone_else() -> None:
    with serve_in_thread(guarded(mode="enforce")) as running:
        assert predict(running, "note=hello+world")[0] == 200
        status, _, body = predict(running, "id=1%27%20UNION%20SELECT%20password%20FROM%20users--")
        assert status == 403 and "injection" in body["error"]
        status, _, body = predict(running, "file=../../../../etc/passwd")
        assert status == 403
        assert predict(running, "note=O%27Brien+selected+the+union+jack")[0] == 200
        stats = running.app.guard.stats if running.app.guard is not None else None
        assert stats is not None and stats.decisions[("block", "injection")] == 2
        _, _, scrape = request(running, "GET", "/metrics")
        assert b'webtorch_guard_decisions_total{action="block",reason="injection"} 2.0' in scrape


def test_monitor_mode_lets_an_attack_through_and_counts_it() -> None:
    with serve_in_thread(guarded(mode="monitor")) as running:
        status, _, _ = predict(running, "id=1%27%20OR%20%271%27=%271")
        assert status == 200
        assert running.app.guard is not None
        assert running.app.guard.stats.decisions[("block", "injection")] == 1


def test_rate_limit_answers_429_with_retry_after() -> None:
    with serve_in_thread(guarded(mode="enforce", model="none", rate=1, burst=3)) as running:
        statuses = [predict(running)[0] for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        status, headers, body = predict(running)
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert "too many requests" in body["error"]


def test_denied_and_over_cap_connections_are_closed_at_once() -> None:
    with serve_in_thread(guarded(mode="enforce", model="none", deny=["127.0.0.0/8"])) as running:
        conn = http.client.HTTPConnection(running.host, running.port, timeout=10)
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            conn.request("GET", "/v2")
            conn.getresponse()
        conn.close()
    with serve_in_thread(guarded(mode="enforce", model="none", max_connections=2)) as running:
        held = [socket.create_connection((running.host, running.port)) for _ in range(2)]
        try:
            # Both admitted: each answers. A third is closed before it is read.
            for sock in held:
                sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            third = socket.create_connection((running.host, running.port))
            assert closed(third)
            third.close()
        finally:
            for sock in held:
                sock.close()


def closed(sock: socket.socket) -> bool:
    """Whether the server closed (or reset) the connection without answering."""
    try:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
        return sock.recv(4096) == b""
    except ConnectionError:
        return True


def test_a_ban_outlasts_the_blocked_request() -> None:
    config = guarded(mode="enforce", ban_seconds=600, client_key="header:x-api-key")
    with serve_in_thread(config) as running:
        xss = "/models/xor/predict?q=%3Cscript%3Ealert(document.cookie)%3C/script%3E"
        attacker, other = {**BROWSER, "X-Api-Key": "k-attacker"}, {**BROWSER, "X-Api-Key": "k-ok"}
        assert request(running, "POST", xss, PREDICT, headers=attacker)[0] == 403
        status, _, body = request(running, "POST", "/models/xor/predict", PREDICT, attacker)
        assert status == 403 and b"banned" in body
        assert request(running, "POST", "/models/xor/predict", PREDICT, headers=other)[0] == 200
        _, _, stats = request(running, "GET", "/dashboard/stats")
        guard = json.loads(stats)["guard"]
        assert guard["bans"] == 1
        # Keys are told apart from addresses (a key "10.0.0.5" is not that address's ban).
        # And a key is an API key: shown by its digest, never whole (issue 19, item 4's sibling).
        assert guard["top_blocked"] == [{"client": shown_client("key:k-attacker"), "blocked": 2}]
        assert guard["top_blocked"][0]["client"].startswith("key:k-…")
        assert b"k-attacker" not in stats


def test_a_banned_address_cannot_connect() -> None:
    with serve_in_thread(guarded(mode="enforce", ban_seconds=600)) as running:
        assert predict(running, "file=../../../../etc/passwd")[0] == 403
        sock = socket.create_connection((running.host, running.port))
        try:
            assert closed(sock)
        finally:
            sock.close()


def test_a_client_leaving_mid_prediction_releases_its_connection_slot() -> None:
    """A prediction still queued when its client goes away must not break the connection's
    clean-up: the guard's per-address count is given back, so the address can connect again."""
    with serve_in_thread(guarded(mode="enforce", model="none", max_connections=1)) as running:
        executor = running.app.executors["xor"]
        running.loop.call_soon_threadsafe(executor.hold)
        sock = socket.create_connection((running.host, running.port))
        body = b'{"inputs": [[0, 1]]}'
        sock.sendall(
            b"POST /models/xor/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        state = running.app.server.state if running.app.server is not None else None
        assert state is not None
        wait_for(lambda: executor_queued(running) == 1)
        # Reset, not a half-close: a half-closed client would still be sent its answer.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        wait_for(lambda: not state.connections)
        running.loop.call_soon_threadsafe(executor.release)
        again = socket.create_connection((running.host, running.port))
        try:
            again.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert again.recv(4096).startswith(b"HTTP/1.1 200")
        finally:
            again.close()


def executor_queued(running: Running) -> int:
    executor = running.app.executors["xor"]
    return len(executor.scheduler)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)  # polling a condition with a deadline, not sleeping for an outcome
