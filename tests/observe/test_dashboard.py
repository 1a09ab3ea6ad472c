"""The dashboard's timeline (fake clocks) and its endpoints on a live server."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

from tests.conftest import Running, serve_in_thread, xor_config
from tests.proxy.test_forward import proxy, request
from tests.proxy.upstreams import upstreams
from webtorch import config as wt_config
from webtorch.http.messages import Request
from webtorch.metrics import Metrics
from webtorch.observe.timeline import Timeline

TOKEN = "dashboard-token-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def timeline(metrics: Metrics, clock: Clock, history: int = 300) -> Timeline:
    return Timeline(metrics, lambda: None, lambda: 3, history, clock=clock, monotonic=clock)


def answer(metrics: Metrics, status: int, seconds: float, route: str = "/r") -> None:
    metrics.observe_request(Request("GET", route, "", [], b"", route=route), status, seconds)


def test_rates_and_percentiles_cover_one_second() -> None:
    metrics, clock = Metrics(), Clock()
    tl = timeline(metrics, clock)
    answer(metrics, 200, 0.5)  # before the baseline: counted in no second's rate
    metrics.compact()
    first = tl.sample()
    assert first["requests"]["rate"] == 0.0 and first["connections"] == 3
    clock.now += 2.0
    for ms in range(1, 101):
        answer(metrics, 200, ms / 1000)
    for _ in range(10):
        answer(metrics, 503, 0.2)
    answer(metrics, 404, 0.001)
    metrics.compact()
    second = tl.sample()["requests"]
    assert second["rate"] == pytest.approx(111 / 2.0)
    assert second["errors"] == pytest.approx(5.0)
    assert second["client_errors"] == pytest.approx(0.5)
    assert second["p50"] == pytest.approx(0.055)  # of 111 values: 1 ms twice, 2..100 ms, 200 ms x10
    assert second["p99"] == pytest.approx(0.2)
    clock.now += 1.0
    metrics.compact()
    idle = tl.sample()["requests"]
    assert idle["rate"] == 0.0 and idle["p50"] is None  # a second with no requests


def test_history_is_bounded_and_readers_get_what_is_new() -> None:
    metrics, clock = Metrics(), Clock()
    tl = timeline(metrics, clock, history=5)
    for _ in range(8):
        clock.now += 1.0
        tl.sample()
    assert [s["seq"] for s in tl.since(0)] == [4, 5, 6, 7, 8]
    assert [s["seq"] for s in tl.since(6)] == [7, 8]
    assert tl.since(8) == []
    assert tl.since(99) == []  # a reader ahead of us (we restarted): nothing, its seq resets


def test_model_throughput_batches_and_loss() -> None:
    metrics, clock = Metrics(), Clock()
    tl = timeline(metrics, clock)
    tl.sample()
    stats, training = metrics.model("xor"), metrics.train("xor")
    for rows in (4, 8):
        stats.batch_rows.observe(rows)
        stats.batches += 1
    for _ in range(12):
        stats.stages["queue"].record(0.001)
    training.steps, training.examples, training.loss = 3, 96, 0.25
    metrics.compact()
    clock.now += 1.0
    xor = tl.sample()["models"]["xor"]
    assert xor == {
        "rate": 12.0,
        "rows": 12.0,
        "batch": 6.0,
        "train_steps": 3.0,
        "train_rows": 96.0,
        "loss": 0.25,
    }


def on_loop(running: Running, fn: Any) -> Any:
    """Run ``fn`` on the server's loop: the timeline belongs to that thread."""

    async def call() -> Any:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), running.loop).result(10)


def stats(running: Running, query: str = "", **headers: str) -> tuple[int, dict[str, Any]]:
    status, _, body = request(running, "GET", "/dashboard/stats" + query, headers=headers)
    return status, json.loads(body)


def test_stats_show_upstream_shares_and_the_learned_policys_predictions(tmp_path: Any) -> None:
    with (
        upstreams("a", "b") as ups,
        proxy(
            [u.address for u in ups],
            policy="learned",
            learned={"state_dir": str(tmp_path)},
        ) as running,
    ):
        # The samples are this test's: the server's own, once a second, could fall between two
        # of its steps (after the last request, or between a sample and the stats that answer
        # it), so its clock is stopped first (on the loop: the handle changes each second).
        on_loop(running, lambda: running.app._compaction.cancel())  # type: ignore[union-attr]
        on_loop(running, running.app.timeline.sample)
        for i in range(40):
            assert request(running, "GET", f"/item/{i}")[0] == 200
        sample = on_loop(running, running.app.timeline.sample)
        group = sample["upstreams"]["backend"]
        servers = group["servers"]
        assert set(servers) == {u.address for u in ups}
        assert sum(s["share"] for s in servers.values()) == pytest.approx(1.0)
        assert all(s["state"] == "healthy" for s in servers.values())
        assert group["predicted"] is not None and group["observed"] is not None
        assert sample["requests"]["rate"] > 0
        status, body = stats(running)
        assert status == 200
        assert body["seq"] == sample["seq"]
        assert body["upstreams"]["backend"]["policy"] == "learned"
        assert [s["address"] for s in body["upstreams"]["backend"]["servers"]] == [
            u.address for u in ups
        ]
        status, newer = stats(running, f"?since={body['seq']}")
        assert status == 200 and newer["samples"] == []


def test_page_and_its_static_files_are_served() -> None:
    with serve_in_thread(xor_config()) as running:
        status, headers, page = request(running, "GET", "/dashboard")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert b"<html" in page.lower()
        status, _, _ = request(running, "GET", "/dashboard/static/dashboard.js")
        assert status == 200
        status, _, body = request(running, "GET", "/dashboard/static/../../config.py")
        assert status == 404, body
        status, body_json = stats(running, "?since=later")
        assert status == 400 and "since" in body_json["error"]
        status, _, _ = request(running, "POST", "/dashboard/stats")
        assert status == 405


def test_token_guards_the_dashboard() -> None:
    cfg = xor_config()
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"token": TOKEN})})
    with serve_in_thread(cfg) as running:
        status, headers, _ = request(running, "GET", "/dashboard")
        assert status == 401 and headers["www-authenticate"].startswith("Basic")
        basic = base64.b64encode(f"admin:{TOKEN}".encode()).decode()
        assert request(running, "GET", "/dashboard", headers={"Authorization": f"Basic {basic}"})[
            0
        ] == (200)
        assert stats(running, Authorization=f"Bearer {TOKEN}")[0] == 200
        wrong = base64.b64encode(b"admin:guess").decode()
        assert stats(running, Authorization=f"Basic {wrong}")[0] == 401
        assert stats(running, Authorization="Basic !!!")[0] == 401


def test_dashboard_can_be_turned_off() -> None:
    data: dict[str, Any] = {"server": {"dashboard": False}}
    with serve_in_thread(wt_config.from_dict(data)) as running:
        status, body = stats(running)
        assert status == 404 and "server.dashboard = false" in body["error"]
