"""docs/METRICS.md lists exactly the metrics a fully configured server exposes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, XOR, serve_in_thread
from tests.proxy.test_forward import request
from tests.proxy.upstreams import upstreams
from webtorch import config as wt_config

REFERENCE = ROOT / "docs" / "METRICS.md"
# Exposed only by a worker of several (server.workers > 1; tests/workers/ scrape it).
WORKERS_ONLY = {
    "webtorch_worker",
    "webtorch_workers",
    "webtorch_worker_restarts_total",
    "webtorch_shared_evicted",
    "webtorch_shared_locks_taken_over_total",
}
_ROW = re.compile(r"^\| `(webtorch_[a-z_]+)` \| (counter|gauge|histogram) \|", re.MULTILINE)


def documented() -> dict[str, str]:
    return dict(_ROW.findall(REFERENCE.read_text()))


def exposed(text: str) -> dict[str, str]:
    names = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("webtorch_"):
            # The parser strips a counter's _total; the reference names what a query uses.
            name = family.name + ("_total" if family.type == "counter" else "")
            names[name] = family.type
    return names


def rich_config(tmp_path: Path, servers: list[str]) -> wt_config.Config:
    data: dict[str, Any] = {
        "server": {"access_log": {"path": str(tmp_path / "access.log")}},
        "guard": {"mode": "monitor", "surge_rate": 5},
        "models": {
            "xor": {"path": str(XOR), "train": {"enabled": True, "state_dir": str(tmp_path)}}
        },
        "upstreams": {
            "backend": {
                "servers": servers,
                "policy": "learned",
                "learned": {"state_dir": str(tmp_path / "balancer")},
            }
        },
        "routes": [{"prefix": "/api/", "upstream": "backend"}],
        "pipelines": {"text": {"path": str(ROOT / "tests" / "pipeline" / "files" / "text.py")}},
        "plugins": [{"path": str(ROOT / "examples" / "plugins" / "redact_emails.py")}],
        "streams": {},
    }
    return wt_config.from_dict(data)


def test_every_exposed_metric_is_documented_and_every_documented_one_exposed(
    tmp_path: Path,
) -> None:
    with (
        upstreams("a", "b") as ups,
        serve_in_thread(rich_config(tmp_path, [u.address for u in ups])) as running,
    ):
        assert request(running, "POST", "/models/xor/predict", b'{"inputs": [[0, 1]]}')[0] == 200
        body = b'{"inputs": [[0, 1]], "targets": [[1]]}'
        json_type = {"Content-Type": "application/json"}
        assert request(running, "POST", "/models/xor/train", body, json_type)[0] == 200
        assert request(running, "GET", "/api/x")[0] == 200
        status, _, scrape = request(running, "GET", "/metrics")
        assert status == 200
    have, want = exposed(scrape.decode()), documented()
    assert sorted(set(have) - set(want)) == [], "exposed but not in docs/METRICS.md"
    missing = set(want) - set(have) - WORKERS_ONLY
    assert sorted(missing) == [], "in docs/METRICS.md but not exposed"
    wrong = {name: (have[name], want[name]) for name in have if have[name] != want[name]}
    assert wrong == {}, "types differ between the server and the reference"
