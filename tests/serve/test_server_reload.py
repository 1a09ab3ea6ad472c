"""Reloading [server] (issue 19, item 5): a reload applies what can change at runtime (the token
above all: the new one works at once and the old one gets 401, everywhere) and refuses, naming
the keys and changing nothing, what needs a restart."""

from __future__ import annotations

import base64
import json
import os
import signal
from pathlib import Path
from typing import Any

from tests.conftest import XOR, Running, serve_in_thread, serve_process
from tests.serve.test_server_models import Reply, call, metric, metrics
from webtorch import config as wt_config

OLD = "old-token-0123456789abcdef"
NEW = "new-token-0123456789abcdef"
JSON_TYPE = {"Content-Type": "application/json"}


def write(path: Path, body: str = "ok", **server: Any) -> None:
    lines = ["[server]"]
    lines += [f"{key} = {toml(value)}" for key, value in server.items()]
    lines += [
        "[models.xor]",
        f"path = {json.dumps(str(XOR))}",
        "[models.xor.train]",
        "enabled = true",
        f"state_dir = {json.dumps(str(path.parent / 'state'))}",
        "[[routes]]",
        'path = "/hello"',
        "return = 200",
        f"body = {json.dumps(body)}",
    ]
    path.write_text("\n".join(lines) + "\n")


def toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def reload(running: Running, token: str | None) -> Reply:
    headers = {**JSON_TYPE, **(bearer(token) if token else {})}
    return call(running, "POST", "/admin/reload", b"", headers)


def uses(running: Running, token: str) -> list[int]:
    """The statuses of every token-protected kind of endpoint, with ``token``."""
    train = json.dumps({"inputs": [[0, 1]], "targets": [[1]]}).encode()
    basic = base64.b64encode(f"any:{token}".encode()).decode()
    return [
        call(running, "POST", "/models/xor/train", train, {**JSON_TYPE, **bearer(token)}).status,
        call(running, "GET", "/models/xor/train", None, bearer(token)).status,
        call(running, "POST", "/v2/repository/index", b"", {**JSON_TYPE, **bearer(token)}).status,
        call(running, "GET", "/dashboard/stats", None, bearer(token)).status,
        call(running, "GET", "/dashboard/stats", None, {"Authorization": f"Basic {basic}"}).status,
    ]


def test_a_rotated_token_applies_at_once_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "webtorch.toml"
    write(path, token=OLD, management=True)
    with serve_in_thread(wt_config.load(path), path) as running:
        assert uses(running, OLD) == [200] * 5
        write(path, token=NEW, management=True)
        reply = reload(running, OLD)
        assert reply.status == 200, reply
        assert "token" in reply.json()["message"]
        assert uses(running, NEW) == [200] * 5
        assert uses(running, OLD) == [401] * 5
        assert reload(running, OLD).status == 401
        assert reload(running, NEW).status == 200


def test_settings_that_need_a_restart_are_refused_and_nothing_changes(tmp_path: Path) -> None:
    path = tmp_path / "webtorch.toml"
    write(path, body="before", token=OLD, management=True, listen="127.0.0.1:8080")
    with serve_in_thread(wt_config.load(path), path) as running:
        # A new route, a new token and a new listen address: the listen spoils the whole file.
        write(path, body="after", token=NEW, management=True, listen="0.0.0.0:9090")
        reply = reload(running, OLD)
        assert reply.status == 409, reply
        assert "listen" in reply.json()["error"] and "restart" in reply.json()["error"]
        assert call(running, "GET", "/hello").body == b"before"  # routes untouched
        assert uses(running, OLD)[0] == 200 and uses(running, NEW)[0] == 401  # token too
        write(path, body="after", token=OLD, management=True, listen="127.0.0.1:8080")
        assert reload(running, OLD).status == 200  # undone: the reload goes through
        assert call(running, "GET", "/hello").body == b"after"


def test_management_and_dashboard_switch_on_reload(tmp_path: Path) -> None:
    path = tmp_path / "webtorch.toml"
    write(path, management=True)
    with serve_in_thread(wt_config.load(path), path) as running:
        assert call(running, "POST", "/v2/repository/index", b"", JSON_TYPE).status == 200
        assert "model_repository" in call(running, "GET", "/v2").json()["extensions"]
        write(path, management=False, dashboard=False)
        assert reload(running, None).status == 200
        assert call(running, "POST", "/v2/repository/index", b"", JSON_TYPE).status == 404
        assert call(running, "POST", "/admin/reload", b"", JSON_TYPE).status == 404
        assert call(running, "GET", "/dashboard/stats").status == 404
        assert "model_repository" not in call(running, "GET", "/v2").json()["extensions"]


def test_new_limits_apply_to_new_connections(tmp_path: Path) -> None:
    path = tmp_path / "webtorch.toml"
    write(path, management=True)
    with serve_in_thread(wt_config.load(path), path) as running:
        body = json.dumps({"inputs": [[0, 1]] * 20}).encode()
        assert call(running, "POST", "/models/xor/predict", body, JSON_TYPE).status == 200
        write(path, management=True, limits={"max_body": 64})
        assert reload(running, None).status == 200
        assert call(running, "POST", "/models/xor/predict", body, JSON_TYPE).status == 413


def test_a_new_connection_cap_applies_at_once(tmp_path: Path) -> None:
    """[server.limits] max_connections is reloadable: the running server's cap changes (it kept
    the cap it started with while the reload answered 200), as /metrics shows."""
    path = tmp_path / "webtorch.toml"
    write(path, management=True, limits={"max_connections": 50})
    with serve_in_thread(wt_config.load(path), path) as running:
        assert metric(metrics(running), "webtorch_http_connections_max") == 50
        write(path, management=True, limits={"max_connections": 7})
        assert reload(running, None).status == 200
        assert running.app.server is not None and running.app.server.state.max_connections == 7
        assert metric(metrics(running), "webtorch_http_connections_max") == 7


def test_sighup_logs_an_error_naming_the_keys_that_need_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "webtorch.toml"
    write(path, body="before")
    # `--listen` (which serve_process passes) overrides the file's listen: not a change.
    with serve_process(path) as proc:
        write(path, body="after", trusted_proxies=["10.0.0.0/8"])
        mark = proc.log_size()
        os.kill(proc.pid, signal.SIGHUP)
        # The refusal is logged once decided: wait for its line.
        line = proc.wait_log(r".*reload failed.*", timeout=30, after=mark)[0]
        assert "ERROR" in line and "trusted_proxies" in line, line
        running = Running(None, "127.0.0.1", proc.port, None)  # type: ignore[arg-type]
        assert call(running, "GET", "/hello").body == b"before"
        write(path, body="after")
        mark = proc.log_size()
        os.kill(proc.pid, signal.SIGHUP)
        proc.wait_log("reloaded", timeout=30, after=mark)
        assert call(running, "GET", "/hello").body == b"after"


def test_a_reload_cannot_drop_the_token_of_a_server_exposed_beyond_loopback(
    tmp_path: Path,
) -> None:
    path = tmp_path / "webtorch.toml"
    write(path, token=OLD, management=True)
    with serve_in_thread(wt_config.load(path), path) as running:
        # As if `serve --listen 0.0.0.0:PORT` had started it (the file says loopback).
        running.app._host = "0.0.0.0"
        write(path, management=True)
        reply = reload(running, OLD)
        assert reply.status == 400 and "server.token" in reply.json()["error"], reply
        assert uses(running, OLD)[0] == 200  # the token still guards training
