"""Policies, affinity and reloads through the running proxy."""

from __future__ import annotations

import http.client
import os
import threading
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import serve_in_thread
from tests.proxy.test_forward import proxy, request
from tests.proxy.upstreams import upstreams
from webtorch import config as wt_config

# Management requests say JSON, even with no body: what no web page sends cross-site (CSRF).
JSON_TYPE = {"Content-Type": "application/json"}


def test_weighted_round_robin_shares_by_weight() -> None:
    with upstreams("a", "b") as (a, b):
        servers = [{"address": a.address, "weight": 3}, b.address]
        with proxy(servers) as running:  # type: ignore[arg-type]
            seen = Counter(request(running, "GET", "/")[1]["x-upstream"] for _ in range(40))
            assert seen == {"a": 30, "b": 10}


def test_hash_keeps_a_model_on_one_upstream() -> None:
    with (
        upstreams("a", "b", "c") as ups,
        proxy([u.address for u in ups], policy="hash", hash_key="header:x-model") as running,
    ):
        homes = {}
        for model in ("resnet", "bert", "xor", "llama", "t5"):
            seen = {
                request(running, "GET", "/", headers={"X-Model": model})[1]["x-upstream"]
                for _ in range(5)
            }
            assert len(seen) == 1, f"{model} moved between {seen}"
            homes[model] = seen.pop()
        assert len(set(homes.values())) > 1  # keys spread over the group


def test_hash_by_path_segment() -> None:
    with (
        upstreams("a", "b", "c") as ups,
        proxy([u.address for u in ups], policy="hash", hash_key="path:3") as running,
    ):
        for model in ("resnet", "bert"):
            seen = {
                request(running, "GET", f"/api/models/{model}/infer?i={i}")[1]["x-upstream"]
                for i in range(4)
            }
            assert len(seen) == 1


def test_sticky_cookie_pins_a_client() -> None:
    with (
        upstreams("a", "b", "c") as ups,
        proxy([u.address for u in ups], sticky={"cookie": "route"}) as running,
    ):
        status, headers, _ = request(running, "GET", "/")
        assert status == 200
        cookie = headers["set-cookie"]
        assert cookie.startswith("route=") and "HttpOnly" in cookie
        first = headers["x-upstream"]
        value = cookie.split(";", 1)[0]
        for _ in range(6):
            status, headers, _ = request(running, "GET", "/", headers={"Cookie": value})
            assert headers["x-upstream"] == first
            assert "set-cookie" not in headers  # the client already has the right one


def test_least_conn_avoids_the_busy_upstream() -> None:
    with (
        upstreams("a", "b") as (a, b),
        proxy([a.address, b.address], policy="least_conn") as running,
    ):
        # One request hangs on whichever upstream it lands on; the rest go to the other.
        hung = http.client.HTTPConnection(running.host, running.port, timeout=30)
        hung.request("GET", "/hang")
        assert a.hanging.wait(5) or b.hanging.wait(5)
        busy = "a" if a.hanging.is_set() else "b"
        seen = {request(running, "GET", "/")[1]["x-upstream"] for _ in range(6)}
        assert busy not in seen
        hung.close()


def write_config(path: Path, servers: list[str], management: bool = True) -> None:
    quoted = ", ".join(f'"{s}"' for s in servers)
    path.write_text(
        f"""
[server]
management = {str(management).lower()}
[server.limits]
drain_timeout = 5

[upstreams.backend]
servers = [{quoted}]

[[routes]]
prefix = "/"
upstream = "backend"
"""
    )


def test_reload_under_load_drops_nothing(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    with upstreams("a", "b") as (a, b):
        write_config(path, [a.address])
        cfg = wt_config.load(path)
        with serve_in_thread(cfg, path) as running:
            stop = threading.Event()
            failures: list[str] = []
            seen: Counter[str] = Counter()
            lock = threading.Lock()

            def client() -> None:
                conn = http.client.HTTPConnection(running.host, running.port, timeout=10)
                while not stop.is_set():
                    try:
                        conn.request("GET", "/")
                        resp = conn.getresponse()
                        body = resp.read()
                    except (OSError, http.client.HTTPException) as exc:
                        failures.append(repr(exc))
                        conn.close()
                        conn = http.client.HTTPConnection(running.host, running.port, timeout=10)
                        continue
                    with lock:
                        if resp.status != 200:
                            failures.append(f"{resp.status} {body!r}")
                        seen[body.decode()] += 1
                conn.close()

            threads = [threading.Thread(target=client) for _ in range(4)]
            for t in threads:
                t.start()
            assert a.wait_for_hits("/", 50)
            write_config(path, [b.address])
            status, _, body = request(
                running,
                "POST",
                "/admin/reload",
                body=b"",
                headers={**JSON_TYPE, "Content-Length": "0"},
            )
            assert status == 200, body
            assert b.wait_for_hits("/", 50), "traffic never moved to the new upstream"
            stop.set()
            for t in threads:
                t.join(10)
            assert failures == []
            hits_a = a.hits["/"]
            assert request(running, "GET", "/")[2] == b"b"
            assert a.hits["/"] == hits_a  # the old group gets nothing after the swap


def test_reload_with_a_bad_file_keeps_serving(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    with upstreams("a") as (a,):
        write_config(path, [a.address])
        with serve_in_thread(wt_config.load(path), path) as running:
            path.write_text("[upstreams.backend]\nservers = []\n")
            status, _, body = request(running, "POST", "/admin/reload", body=b"", headers=JSON_TYPE)
            assert status == 400 and b"servers" in body
            assert request(running, "GET", "/")[2] == b"a"


def test_reload_endpoint_is_off_without_management(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    with upstreams("a") as (a,):
        write_config(path, [a.address], management=False)
        with serve_in_thread(wt_config.load(path), path) as running:
            assert request(running, "POST", "/admin/reload", body=b"")[0] == 404


def test_sighup_reloads(tmp_path: Path) -> None:
    from tests.conftest import serve_process

    path = tmp_path / "proxy.toml"
    with upstreams("a", "b") as (a, b):
        write_config(path, [a.address], management=False)
        with serve_process(path) as proc:
            conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
            conn.request("GET", "/")
            assert conn.getresponse().read() == b"a"
            write_config(path, [b.address], management=False)
            mark = proc.log_size()
            os.kill(proc.pid, 1)  # SIGHUP
            # The reload is logged once done: wait for that line, not for time.
            proc.wait_log("reloaded", timeout=30, after=mark)
            conn.request("GET", "/")
            assert conn.getresponse().read() == b"b"
            conn.close()


def test_reload_endpoint_needs_the_token_when_one_is_set(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    with upstreams("a") as (a,):
        write_config(path, [a.address])
        path.write_text(
            path.read_text().replace("[server]\n", '[server]\ntoken = "s3cret-token-0123456789"\n')
        )
        with serve_in_thread(wt_config.load(path), path) as running:
            status, headers, _ = request(running, "POST", "/admin/reload", b"", JSON_TYPE)
            assert status == 401 and "www-authenticate" in headers
            status, _, body = request(
                running,
                "POST",
                "/admin/reload",
                body=b"",
                headers={**JSON_TYPE, "Authorization": "Bearer s3cret-token-0123456789"},
            )
            assert status == 200, body
            # Proxied traffic itself needs no token.
            assert request(running, "GET", "/")[0] == 200


def test_learned_policy_avoids_a_fast_failing_server_and_keeps_its_weights(
    tmp_path: Path,
) -> None:
    learned = {"state_dir": str(tmp_path / "balancer"), "batch": 16, "train_interval": 0.01}
    with upstreams("a", "b") as (a, b):
        b.fail_with = 503  # answers at once, with an error: must not look "fast"
        with proxy(
            [a.address, b.address],
            policy="learned",
            learned=learned,
            max_fails=0,
            outlier={"consecutive_5xx": 0, "consecutive_gateway_failure": 0},
        ) as running:
            for _ in range(200):
                assert request(running, "GET", "/")[0] == 200  # b's 503s are retried on a
            assert b.hits["/"] < 20, b.hits["/"]
    # Stopping the server saved what the policy learned.
    assert (tmp_path / "balancer" / "weights.safetensors").exists()


@pytest.mark.parametrize(
    "policy", ["round_robin", "least_conn", "random2", "hash", "peak_ewma", "prequal", "learned"]
)
def test_every_policy_works_with_health_and_retries(
    policy: str, tmp_path: Path, refused_address: str
) -> None:
    extra: dict[str, object] = {"policy": policy, "hash_key": "header:x-key"}
    if policy == "learned":
        extra["learned"] = {"state_dir": str(tmp_path)}
    with (
        upstreams("a", "b") as (a, b),
        proxy([refused_address, a.address, b.address], **extra) as running,
    ):
        for i in range(30):
            status, headers, _ = request(running, "GET", "/", headers={"X-Key": f"k{i % 5}"})
            assert status == 200  # the dead server's refusals are retried, then it is left out
            assert headers["x-upstream"] in ("a", "b")
