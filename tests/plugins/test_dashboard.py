"""Per plugin and phase on the dashboard: a server's own stats, and several workers' summed."""

from __future__ import annotations

import json
from pathlib import Path

from tests.plugins.helpers import config, request, serving, write_plugins
from webtorch.workers.board import merge_current

NOOP = """
class Noop:
    def request(self, ctx):
        return None

    def log(self, ctx):
        raise RuntimeError("counted")

plugin = Noop()
"""


def test_the_dashboard_shows_calls_errors_and_time(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"noop": NOOP})
    with serving(config(tmp_path, [{"path": "noop.py", "routes": ["/fixed"]}])) as running:
        for _ in range(3):
            assert request(running, "GET", "/fixed")[0] == 200
        status, _, body = request(running, "GET", "/dashboard/stats")
    assert status == 200
    rows = {(r["plugin"], r["phase"]): r for r in json.loads(body)["plugins"]}
    assert rows[("noop", "request")]["calls"] == 3
    assert rows[("noop", "request")]["seconds"] > 0
    # log runs once the response is ready, before it is written: all three are in
    assert rows[("noop", "log")]["errors"] == 3


def test_several_workers_rows_are_summed() -> None:
    def current(calls: int, seconds: float) -> dict[str, object]:
        row = {"plugin": "p", "phase": "request", "calls": calls, "errors": 1}
        row |= {"timeouts": 0, "seconds": seconds}
        return {"upstreams": {}, "models": {}, "guard": None, "pipelines": {}, "plugins": [row]}

    merged = merge_current([current(3, 0.5), current(4, 0.25), {**current(0, 0), "plugins": []}])
    assert merged["plugins"] == [
        {"plugin": "p", "phase": "request", "calls": 7, "errors": 2, "timeouts": 0, "seconds": 0.75}
    ]
