"""Load probes, both sides, over real sockets: the prober against WebTorch and h11 upstreams,
``GET /v2/health/load`` on WebTorch, and a prequal proxy steering by what upstreams report."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest

from tests.conftest import Running, serve_in_thread, xor_config
from tests.proxy.test_forward import proxy
from tests.proxy.upstreams import TestUpstream, raw_upstream, upstreams
from webtorch import config as wt_config
from webtorch.balance.base import Policy, ProbeResult, Upstream
from webtorch.http.messages import Request
from webtorch.metrics import LATENCY_BUCKETS, Metrics
from webtorch.proxy.probe import (
    LOAD_PATH,
    LoadReport,
    Prober,
    is_service_route,
    median_of_buckets,
    parse_load,
)
from webtorch.proxy.upstream import UpstreamGroup

REQUEST = Request("GET", "/", "", [], b"")


class Recorder(Policy):
    """A policy that only records what its probes bring back."""

    name = "recorder"
    probing = True

    def __init__(self) -> None:
        super().__init__([])
        self.results: list[tuple[Upstream, ProbeResult | None, float]] = []
        self._arrived = asyncio.Event()

    def pick(self, request: Request, candidates: Sequence[Upstream], now: float) -> Upstream:
        return candidates[0]

    def on_probe(self, upstream: Upstream, load: ProbeResult | None, now: float) -> None:
        self.results.append((upstream, load, now))
        self._arrived.set()

    async def wait(self, count: int, within: float = 5.0) -> list[ProbeResult | None]:
        async with asyncio.timeout(within):
            while len(self.results) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return [load for _, load, _ in self.results]


def upstream_of(host: str, port: int) -> Upstream:
    return Upstream(f"{host}:{port}", host, port)


def get_json(running: Running, target: str) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection(running.host, running.port, timeout=10)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


# --- the wire format and the server's arithmetic ----------------------------------------------


def test_parse_load_accepts_only_a_load_report() -> None:
    assert parse_load(b'{"inflight": 3, "latency": 0.25}') == ProbeResult(3, 0.25)
    assert parse_load(b'{"inflight": 0, "latency": 0, "extra": 1}') == ProbeResult(0, 0.0)
    assert parse_load(b'{"inflight": 2}') == ProbeResult(2, 0.0)
    for bad in (
        b"",
        b"up",
        b"[1, 2]",
        b'{"latency": 0.1}',
        b'{"inflight": -1, "latency": 0.1}',
        b'{"inflight": 1.5, "latency": 0.1}',
        b'{"inflight": true, "latency": 0.1}',
        b'{"inflight": 1, "latency": -0.1}',
        b'{"inflight": 1, "latency": "fast"}',
        b'{"inflight": 1, "latency": 1e999}',
    ):
        assert parse_load(bad) is None, bad


def test_median_of_buckets_interpolates_within_its_bucket() -> None:
    bounds = np.asarray(LATENCY_BUCKETS)
    counts = np.zeros(len(bounds) + 1, dtype=np.int64)
    assert median_of_buckets(bounds, counts) == 0.0
    counts[bounds.tolist().index(0.01)] = 10  # ten answers in (0.005, 0.01]
    assert median_of_buckets(bounds, counts) == pytest.approx(0.0075)
    counts[-1] = 100  # most above every bound: the last bound is all that is known
    assert median_of_buckets(bounds, counts) == bounds[-1]


def test_only_service_routes_count_toward_latency() -> None:
    for name in ("/", "/api/", "/v2/models/xor/infer", "/models/xor/predict", "/models/m/train"):
        assert is_service_route(name), name
    for name in (
        LOAD_PATH,
        "/v2/health/live",
        "/v2",
        "/metrics",
        "/admin/reload",
        "unmatched",
        "/v2/models/xor",
        "/v2/models/xor/ready",
        "/models/xor",
        "/v2/repository/index",
    ):
        assert not is_service_route(name), name


def test_load_report_latency_is_recent_and_ignores_control_routes() -> None:
    metrics = Metrics()
    clock = [0.0]
    report = LoadReport(lambda: None, metrics, window=5.0, refresh=0.1, clock=lambda: clock[0])
    assert report.latency() == 0.0
    api = Request("GET", "/api/x", "", [], b"", route="/api/")
    probe = Request("GET", LOAD_PATH, "", [], b"", route=LOAD_PATH)
    for _ in range(100):
        metrics.observe_request(api, 200, 0.2)
        metrics.observe_request(probe, 200, 0.00001)  # many, fast: must not pull it down
    clock[0] = 0.05
    assert report.latency() == 0.0  # computed at most every `refresh` seconds
    clock[0] = 0.2
    assert 0.1 < report.latency() <= 0.25
    clock[0] = 5.5  # a window later: the 0.2 s answers are still within the last two windows
    for _ in range(10):
        metrics.observe_request(api, 200, 0.002)
    assert 0.1 < report.latency() <= 0.25
    clock[0] = 11.0  # two windows later: only what came since 5.5 counts
    for _ in range(10):
        metrics.observe_request(api, 200, 0.002)
    assert 0.001 < report.latency() <= 0.0025
    assert report.inflight() == 0  # no server


# --- the server's side, on a real server ------------------------------------------------------


def test_webtorch_answers_its_load() -> None:
    with serve_in_thread(xor_config()) as running:
        for _ in range(5):
            conn = http.client.HTTPConnection(running.host, running.port, timeout=10)
            conn.request("POST", "/models/xor/predict", body=b'{"inputs": [[0, 1]]}')
            assert conn.getresponse().status == 200
            conn.close()
        status, body = get_json(running, LOAD_PATH)
        assert status == 200
        assert set(body) == {"inflight", "latency"}
        assert body["inflight"] == 0
        assert isinstance(body["latency"], float) and 0.0 < body["latency"] < 1.0
        conn = http.client.HTTPConnection(running.host, running.port, timeout=10)
        conn.request("POST", LOAD_PATH, body=b"")
        resp = conn.getresponse()
        assert resp.status == 405
        conn.close()


def test_webtorch_counts_the_requests_it_is_working_on() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        held = []
        try:
            for _ in range(2):
                sock = socket.create_connection((running.host, running.port), timeout=10)
                sock.sendall(b"GET /hang HTTP/1.1\r\nhost: test\r\n\r\n")
                held.append(sock)
            assert a.wait_for_hits("/hang", 2)
            status, body = get_json(running, LOAD_PATH)
            assert status == 200
            assert body["inflight"] == 2  # the two held, not the probe itself
        finally:
            for sock in held:
                sock.close()
        assert a.wait_disconnects(2)
        assert get_json(running, LOAD_PATH)[1]["inflight"] == 0


def test_a_user_route_cannot_shadow_the_load_endpoint() -> None:
    with pytest.raises(Exception, match="built-in route"):
        wt_config.from_dict({"routes": [{"path": LOAD_PATH, "return": 200}]})


# --- the prober -------------------------------------------------------------------------------


def test_prober_reads_a_webtorch_servers_load() -> None:
    async def main(running: Running) -> None:
        recorder = Recorder()
        prober = Prober(recorder, LOAD_PATH, 5.0, asyncio.get_running_loop())
        up = upstream_of(running.host, running.port)
        prober.send([up])
        assert await recorder.wait(1) == [ProbeResult(0, 0.0)]
        prober.send([up])
        assert await recorder.wait(2) == [ProbeResult(0, 0.0)] * 2
        assert recorder.results[0][0] is up
        assert prober.sent == 2 and prober.inflight == 0
        assert running.app.server is not None
        assert len(running.app.server.state.connections) == 1  # kept alive, reused
        prober.close()

    with serve_in_thread(xor_config()) as running:
        asyncio.run(main(running))


def test_prober_reuses_one_connection_and_reports_what_the_upstream_says() -> None:
    async def main(a: TestUpstream) -> None:
        recorder = Recorder()
        prober = Prober(recorder, LOAD_PATH, 5.0, asyncio.get_running_loop())
        up = upstream_of("127.0.0.1", a.port)
        for i in range(5):
            prober.send([up])
            await recorder.wait(i + 1)
        assert recorder.results[-1][1] == ProbeResult(3, 0.25)
        assert a.connections == 1
        prober.close()

    with upstreams("a") as (a,):
        a.load_inflight, a.load_latency = 3, 0.25
        asyncio.run(main(a))


def test_prober_reconnects_when_its_idle_connection_was_closed() -> None:
    async def main(a: TestUpstream) -> None:
        recorder = Recorder()
        prober = Prober(recorder, LOAD_PATH, 5.0, asyncio.get_running_loop())
        up = upstream_of("127.0.0.1", a.port)
        prober.send([up])
        assert await recorder.wait(1) == [ProbeResult(0, 0.0)]
        a.stop()  # every connection reset, the listener gone...
        b = TestUpstream("b", port=a.port).start()  # ...and a new server on the same port
        try:
            b.load_inflight = 7
            prober.send([up])
            assert (await recorder.wait(2))[1] == ProbeResult(7, 0.0)
        finally:
            prober.close()
            b.stop()

    a = TestUpstream("a").start()
    try:
        asyncio.run(main(a))
    finally:
        a.stop()


def test_a_probe_at_a_time_per_upstream_and_a_timeout_reports_none() -> None:
    async def main(a: TestUpstream) -> None:
        recorder = Recorder()
        prober = Prober(recorder, "/hang", 0.3, asyncio.get_running_loop())
        up = upstream_of("127.0.0.1", a.port)
        prober.send([up])
        prober.send([up, up])  # one is in flight to it: these are skipped, never queued
        assert (prober.sent, prober.skipped, prober.inflight) == (1, 2, 1)
        assert await recorder.wait(1) == [None]
        assert prober.inflight == 0
        prober.close()

    with upstreams("a") as (a,):
        asyncio.run(main(a))
        assert a.wait_disconnects(1)  # the timed-out probe's connection was closed


def test_upstreams_that_do_not_report_load_or_do_not_listen_give_none() -> None:
    async def main(a: TestUpstream, closed_port: int) -> None:
        recorder = Recorder()
        loop = asyncio.get_running_loop()
        up = upstream_of("127.0.0.1", a.port)
        for path in ("/", "/status?code=404", "/bytes?n=10&chunked=1", "/close"):
            Prober(recorder, path, 5.0, loop).send([up])
        Prober(recorder, LOAD_PATH, 5.0, loop).send([upstream_of("127.0.0.1", closed_port)])
        assert await recorder.wait(5) == [None] * 5

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]  # bound, never listening: refused
        with upstreams("a") as (a,):
            asyncio.run(main(a, closed_port))


def test_closing_the_prober_cancels_its_probes() -> None:
    async def main(a: TestUpstream) -> None:
        recorder = Recorder()
        prober = Prober(recorder, "/hang", 30.0, asyncio.get_running_loop())
        prober.send([upstream_of("127.0.0.1", a.port)])
        await asyncio.to_thread(a.hanging.wait, 10)
        prober.close()
        await asyncio.sleep(0)  # let the cancellation run
        await asyncio.sleep(0)
        assert recorder.results == [] and prober.inflight == 0
        prober.send([upstream_of("127.0.0.1", a.port)])  # closed: nothing starts
        assert prober.sent == 1

    with upstreams("a") as (a,):
        asyncio.run(main(a))
        assert a.wait_disconnects(1)


def test_a_probe_goes_through_the_upstream_client_and_its_limits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    report = b'{"inflight": 4, "latency": 0.5}'
    answers: list[bytes] = [
        # An interim head first, as for proxied requests: skipped, the report after it read.
        b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(report), report),
        # A head without end: refused at the prober's head limit, the connection closed.
        b"HTTP/1.1 200 OK\r\n" + (b"x-filler: " + b"a" * 1000 + b"\r\n") * 1000,
        # A body larger than a load report can be: refused before it is read.
        b"HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\n\r\n{",
    ]

    async def main(up: Upstream) -> list[ProbeResult | None]:
        recorder = Recorder()
        prober = Prober(recorder, LOAD_PATH, 10.0, asyncio.get_running_loop())
        try:
            for i in range(len(answers)):
                prober.send([up])
                await recorder.wait(i + 1)
            return [load for _, load, _ in recorder.results]
        finally:
            prober.close()

    with raw_upstream(lambda head: [answers.pop(0)]) as raw:
        results = asyncio.run(main(upstream_of("127.0.0.1", raw.port)))
        assert results == [ProbeResult(4, 0.5), None, None]
        # The first connection was kept for the second probe; each refusal closed its own.
        assert len(raw.closed) == 2 and raw.closed[0].wait(10) and raw.closed[1].wait(10)
        assert all(head.startswith(b"GET /v2/health/load HTTP/1.1\r\n") for head in raw.requests)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "larger than 16384 bytes (max_response_header_bytes)" in warned
    assert len(caplog.records) == 1  # the next problem within the minute is counted, not logged


# --- wiring -----------------------------------------------------------------------------------


def test_only_a_probing_policy_gets_a_prober() -> None:
    loop = asyncio.new_event_loop()
    try:
        cfg = wt_config.from_dict(
            {
                "upstreams": {
                    "p": {
                        "servers": ["127.0.0.1:1", "127.0.0.1:2"],
                        "policy": "prequal",
                        "prequal": {"probe_path": "/load", "probe_timeout": 0.2},
                    },
                    "r": {"servers": ["127.0.0.1:1"]},
                }
            }
        )
        probing = UpstreamGroup("p", cfg.upstreams["p"], loop)
        plain = UpstreamGroup("r", cfg.upstreams["r"], loop)
        assert probing.probing and probing.prober is not None
        assert (probing.prober.path, probing.prober.timeout) == ("/load", 0.2)
        assert not plain.probing and plain.prober is None
        probing.close()
        assert probing.prober.closed
        plain.close()
    finally:
        loop.close()


def test_a_prequal_proxy_steers_away_from_the_upstream_reporting_high_load() -> None:
    with upstreams("a", "b", nodelay=True) as (a, b):
        a.load_inflight, b.load_inflight = 0, 50

        def send(running: Running, count: int) -> Counter[str]:
            seen: Counter[str] = Counter()
            conn = http.client.HTTPConnection(running.host, running.port, timeout=10)
            try:
                for _ in range(count):
                    conn.request("GET", "/")
                    resp = conn.getresponse()
                    resp.read()
                    assert resp.status == 200
                    seen[resp.getheader("x-upstream", "")] += 1
            finally:
                conn.close()
            return seen

        with proxy([a.address, b.address], policy="prequal") as running:
            send(running, 20)  # warm up: the first picks come before any probe is back
            first = send(running, 200)
            assert first["b"] < 50, first  # round robin: 100
            assert a.hits[LOAD_PATH] > 20 and b.hits[LOAD_PATH] > 20  # both probed
            # The load moves: so does the traffic, within the pool's turnover.
            a.load_inflight, b.load_inflight = 50, 0
            send(running, 40)
            second = send(running, 200)
            assert second["a"] < 50, second
