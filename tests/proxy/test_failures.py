"""Upstream failures as clients see them: each failure mode, the retry rules, health and
ejection transitions, and clients that go away."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections import Counter

import pytest

from tests.proxy.test_forward import proxy, request
from tests.proxy.upstreams import TestUpstream, upstreams


def test_connection_refused_is_502_naming_the_upstream(refused_address: str) -> None:
    dead = refused_address
    with proxy([dead]) as running:
        status, headers, body = request(running, "GET", "/")
        assert status == 502
        assert headers["content-type"] == "application/json"
        assert dead in json.loads(body)["error"]


def test_refused_upstream_is_retried_elsewhere_for_any_method(refused_address: str) -> None:
    with (
        upstreams("a") as (a,),
        proxy([refused_address, a.address], policy="round_robin") as running,
    ):
        for method in ("GET", "POST", "GET", "POST"):
            status, headers, _ = request(running, method, "/echo", body=b"{}")
            assert status == 200 and headers["x-upstream"] == "a"


def test_black_hole_is_504_after_the_read_timeout() -> None:
    with upstreams("a") as (a,), proxy([a.address], read_timeout=0.3) as running:
        started = time.monotonic()
        status, _, body = request(running, "GET", "/hang")
        assert status == 504
        assert "timeout" in json.loads(body)["error"]
        assert time.monotonic() - started < 5


def test_reset_before_the_response_is_502() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        status, _, _ = request(running, "POST", "/close", body=b"x")
        assert status == 502


def test_reset_mid_response_is_a_visible_truncation() -> None:
    # 200 KiB sent of a 10 MB body: streamed, so the client has the head already and must see
    # the body cut short, not a complete-looking response.
    with upstreams("a") as (a,), proxy([a.address]) as running:
        conn = http.client.HTTPConnection(running.host, running.port, timeout=10)
        conn.request("GET", "/reset?after=200000")
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
        conn.close()


def test_reset_is_retried_for_get_and_the_last_failure_relayed() -> None:
    with upstreams("a", "b") as (a, b), proxy([a.address, b.address], max_fails=0) as running:
        status, _, _ = request(running, "GET", "/close")
        assert status == 502  # both reset /close: the last failure reaches the client
        assert a.hits["/close"] == 1 and b.hits["/close"] == 1


def test_5xx_is_retried_for_get_and_relayed_when_nowhere_else() -> None:
    with upstreams("a", "b") as (a, b), proxy([a.address, b.address], max_fails=0) as running:
        status, _, body = request(running, "GET", "/status?code=503")
        assert status == 503 and body == b"status 503"  # the upstream's own answer
        assert a.hits["/status"] == 1 and b.hits["/status"] == 1  # tried both


def test_post_is_not_retried_once_sent() -> None:
    with upstreams("a", "b") as (a, b), proxy([a.address, b.address], max_fails=0) as running:
        status, _, _ = request(running, "POST", "/status?code=503", body=b"{}")
        assert status == 503
        assert a.hits["/status"] + b.hits["/status"] == 1


def test_post_is_retried_when_the_route_opts_in() -> None:
    with (
        upstreams("a", "b") as (a, b),
        proxy([a.address, b.address], {"retry_non_idempotent": True}, max_fails=0) as running,
    ):
        status, _, _ = request(running, "POST", "/status?code=503", body=b"{}")
        assert status == 503
        assert a.hits["/status"] + b.hits["/status"] == 2


def test_retries_stop_at_tries() -> None:
    with (
        upstreams("a", "b", "c") as ups,
        proxy([u.address for u in ups], max_fails=0, retry={"tries": 2}) as running,
    ):
        request(running, "GET", "/status?code=502")
        assert sum(u.hits["/status"] for u in ups) == 2


def test_streamed_upload_is_replayed_on_retry(refused_address: str) -> None:
    body = b"z" * 300_000
    with upstreams("a") as (a,), proxy([refused_address, a.address]) as running:
        for _ in range(2):
            status, _, answer = request(running, "PUT", "/echo", body=body)
            assert status == 200
            assert json.loads(answer)["body_bytes"] == len(body)


# -- health ------------------------------------------------------------------------------------


def test_failed_upstream_is_left_alone_for_fail_timeout() -> None:
    with (
        upstreams("a", "b") as (a, b),
        proxy([a.address, b.address], max_fails=1, fail_timeout=60) as running,
    ):
        a_port = a.port
        a.stop()
        seen = Counter()
        for _ in range(10):
            status, headers, _ = request(running, "GET", "/")
            assert status == 200  # the refused attempt was retried on b
            seen[headers["x-upstream"]] += 1
        assert seen == {"b": 10}
        # a is back, but within fail_timeout it gets nothing.
        a2 = TestUpstream("a", a_port).start()
        try:
            for _ in range(4):
                assert request(running, "GET", "/")[1]["x-upstream"] == "b"
            assert a2.hits["/"] == 0
        finally:
            a2.stop()


def test_active_health_check_takes_an_upstream_out_and_back() -> None:
    check = {"path": "/health", "interval": 0.05, "timeout": 1.0, "fails": 1, "passes": 1}
    with (
        upstreams("a", "b") as (a, b),
        proxy([a.address, b.address], health_check=check) as running,
    ):
        a.healthy = False
        # Wait (on state, not on time) until the check has seen it.
        group = running.app.proxies.groups["backend"]  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while group.health.state_of(group.upstreams[0], time.monotonic()) != "unhealthy":
            assert time.monotonic() < deadline, "the active check never marked a unhealthy"
            a.wait_for_hits("/health", a.hits["/health"] + 1)
        assert {request(running, "GET", "/")[1]["x-upstream"] for _ in range(6)} == {"b"}
        a.healthy = True
        while group.health.state_of(group.upstreams[0], time.monotonic()) == "unhealthy":
            assert time.monotonic() < deadline + 10, "a never came back"
            a.wait_for_hits("/health", a.hits["/health"] + 1)
        assert "a" in {request(running, "GET", "/")[1]["x-upstream"] for _ in range(6)}


# -- clients that leave ------------------------------------------------------------------------


def test_client_disconnect_cancels_the_upstream_request() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        sock = socket.create_connection((running.host, running.port), timeout=10)
        sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        assert a.hanging.wait(10)
        sock.close()
        assert a.wait_disconnects(1), "the upstream request was not cancelled"
        # The proxy released the attempt before closing the connection the upstream saw close.
        group = running.app.proxies.groups["backend"]  # type: ignore[union-attr]
        assert group.upstreams[0].inflight == 0


def test_upstream_metrics_are_exposed(refused_address: str) -> None:
    dead = refused_address
    with upstreams("a") as (a,), proxy([dead, a.address]) as running:
        for _ in range(3):
            assert request(running, "GET", "/")[0] == 200
        _, _, body = request(running, "GET", "/metrics")
        text = body.decode()
        assert (
            f'webtorch_upstream_attempts_total{{group="backend",upstream="{a.address}"}} 3.0'
            in text
        )
        assert (
            f'webtorch_upstream_failures_total{{group="backend",outcome="connect_failed",'
            f'upstream="{dead}"}} 1.0'
        ) in text
        assert (
            f'webtorch_upstream_state{{group="backend",state="unavailable",upstream="{dead}"}}'
            in text
        )
        assert 'webtorch_upstream_retries_total{group="backend"} 1.0' in text
        assert "webtorch_upstream_response_seconds_bucket" in text


def test_total_timeout_bounds_an_attempt() -> None:
    # The upstream never answers: the read timeout is long, the total timeout is not.
    with upstreams("a") as (a,), proxy([a.address], read_timeout=30, total_timeout=0.3) as running:
        started = time.monotonic()
        status, _, _ = request(running, "GET", "/hang")
        assert status == 504
        assert time.monotonic() - started < 5


def test_retry_budget_bounds_retries_in_an_outage() -> None:
    # Every server answers 503: each GET could try all three. The budget (10% of requests, no
    # reserve) lets about one request in ten retry, so the outage is not tripled.
    retry = {"tries": 3, "budget_percent": 10, "budget_min_per_second": 0}
    with upstreams("a", "b", "c") as ups:
        for up in ups:
            up.fail_with = 503
        with proxy(
            [u.address for u in ups], max_fails=0, retry=retry, outlier={"consecutive_5xx": 0}
        ) as running:
            for _ in range(100):
                assert request(running, "GET", "/")[0] == 503
            sent = sum(u.hits["/"] for u in ups)
            assert 100 <= sent <= 112, sent


def test_outlier_ejection_routes_around_a_failing_server() -> None:
    outlier = {"consecutive_5xx": 3, "base_ejection_time": 60}
    with (
        upstreams("a", "b") as (a, b),
        proxy([a.address, b.address], max_fails=0, outlier=outlier) as running,
    ):
        a.fail_with = 502
        # Retried on b (502 is in the default retry conditions), so no client sees it.
        for _ in range(10):
            assert request(running, "GET", "/")[0] == 200
        hits = a.hits["/"]
        assert hits == 3  # ejected at its third consecutive 5xx
        for _ in range(10):
            request(running, "GET", "/")
        assert a.hits["/"] == hits
        group = running.app.proxies.groups["backend"]  # type: ignore[union-attr]
        assert group.health.ejections_total(group.upstreams[0]) == 1
