"""The shipped example plugins (examples/plugins/) against real servers and upstreams."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, Running
from tests.plugins.helpers import config, request, serving
from tests.proxy.upstreams import upstreams

EXAMPLES = ROOT / "src" / "webtorch" / "examples" / "plugins"


def _plugin(running: Running, name: str) -> Any:
    (found,) = [p for p in running.app.plugins.plugins.plugins if p.name == name]
    return found.obj


def test_api_keys_authenticate_and_keep_quotas(tmp_path: Path) -> None:
    settings = {"keys": {"k-alice": 3, "k-bob": 1}, "window": 3600}
    with upstreams("a") as (up,):
        path = config(
            tmp_path,
            [{"path": str(EXAMPLES / "api_keys.py"), "routes": ["/echo"], "settings": settings}],
            routes=[{"path": "/open", "return": 204}, {"prefix": "/", "upstream": "backend"}],
            upstreams={"backend": [up.address]},
        )
        with serving(path) as running:
            status, headers, _ = request(running, "GET", "/echo")
            assert status == 401 and "x-api-key" in headers["www-authenticate"]
            assert request(running, "GET", "/echo", headers={"x-api-key": "nope"})[0] == 401
            for left in (2, 1, 0):
                status, headers, body = request(
                    running, "GET", "/echo", headers={"x-api-key": "k-alice"}
                )
                assert status == 200 and headers["x-quota-remaining"] == str(left)
                sent = [k for k, _ in json.loads(body)["headers"]]
                assert "x-api-key" not in sent  # the key stays with this server
            status, headers, body = request(
                running, "GET", "/echo", headers={"x-api-key": "k-alice"}
            )
            assert status == 429 and int(headers["retry-after"]) >= 1
            assert b"quota of 3" in body
            # per key: bob has his own
            assert request(running, "GET", "/echo", headers={"x-api-key": "k-bob"})[0] == 200
            assert request(running, "GET", "/open")[0] == 204  # not the plugin's route
            # a new window starts afresh (the plugin's clock, moved)
            keys = _plugin(running, "api_keys")
            keys.clock = lambda: 7200.5
            assert request(running, "GET", "/echo", headers={"x-api-key": "k-bob"})[0] == 200
    assert up.hits["/echo"] == 5


def test_redact_emails_in_json_bodies(tmp_path: Path) -> None:
    document = {"users": [{"name": "Ann", "mail": "ann.lee+x@example.co.uk"}], "n": 1}
    text = json.dumps(document)
    path = config(
        tmp_path,
        [{"path": str(EXAMPLES / "redact_emails.py")}],
        routes=[
            {"path": "/json", "return": 200, "body": text, "content_type": "application/json"},
            {
                "path": "/text",
                "return": 200,
                "body": "mail ann@example.com",
                "content_type": "text/plain",
            },
        ],
    )
    with serving(path) as running:
        status, headers, body = request(running, "GET", "/json")
        assert status == 200
        assert json.loads(body) == {"users": [{"name": "Ann", "mail": "[redacted]"}], "n": 1}
        assert int(headers["content-length"]) == len(body)
        assert request(running, "GET", "/text")[2] == b"mail ann@example.com"


def test_redact_emails_in_a_streamed_proxied_body(tmp_path: Path) -> None:
    with upstreams("a") as (up,):
        path = config(
            tmp_path,
            [{"path": str(EXAMPLES / "redact_emails.py")}],
            routes=[{"prefix": "/", "upstream": "backend"}],
            upstreams={"backend": [up.address]},
        )
        with serving(path) as running:
            # the upstream's /echo answers JSON naming the request's headers
            status, _, body = request(
                running, "GET", "/echo", headers={"x-contact": "someone@example.org"}
            )
            assert status == 200
            sent = dict(json.loads(body)["headers"])
            assert sent["x-contact"] == "[redacted]"


def _train_now(running: Running, plugin: Any) -> None:
    asyncio.run_coroutine_threadsafe(plugin.train(), running.loop).result(60)


def test_learned_cost_steers_what_it_learned_is_expensive(tmp_path: Path) -> None:
    with upstreams("cheap", "dedicated") as (cheap, dedicated):
        settings = {"expensive_upstream": dedicated.address, "threshold_ms": 100}
        path = config(
            tmp_path,
            [{"path": str(EXAMPLES / "learned_cost.py"), "settings": settings, "timeout": 30}],
            routes=[{"prefix": "/", "upstream": "backend"}],
            upstreams={"backend": [cheap.address, dedicated.address]},
            models={
                "cost": {
                    "path": str(EXAMPLES / "cost_model.py"),
                    "train": {"enabled": True, "state_dir": str(tmp_path / "state")},
                }
            },
        )
        with serving(path) as running:
            learned = _plugin(running, "learned_cost")
            # What log would gather from real outcomes, here with the costs chosen: reports
            # (x-report: full) take 1 s, everything else 1 ms.
            heavy = {"x-report": "full"}
            for _ in range(3):
                status, _, body = request(running, "GET", "/r", headers=heavy)
                assert status == 200, body
                assert request(running, "GET", "/r")[0] == 200
            assert len(learned.examples) == 6  # log gathered one per proxied request
            seen = list(learned.examples)
            for _ in range(150):
                learned.examples = [
                    (x, math.log1p(1000.0 if i % 2 == 0 else 1.0)) for i, (x, _) in enumerate(seen)
                ]
                _train_now(running, learned)
            cheap.hits.clear()
            dedicated.hits.clear()
            for _ in range(4):
                assert request(running, "GET", "/r", headers=heavy)[0] == 200
                assert request(running, "GET", "/r")[0] == 200
            assert dedicated.hits["/r"] == 4 and cheap.hits["/r"] == 4
            status, _, body = request(running, "GET", "/models/cost/train")
            assert status == 200 and json.loads(body)["step"] >= 150
