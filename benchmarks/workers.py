"""WebTorch with 1 and 2 workers against nginx with 1 and 2 workers, same run: predict and proxy.

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/workers.py [--duration 5] [--warmup 2]
        [--rounds 2] [--connections 64]

- predict: WebTorch serving XOR (``POST /models/xor/predict``), nginx ``return 200`` with the
  same answer (what benchmarks/run.py compares: nginx's figure is the HTTP ceiling, not a model).
- proxy: ``GET /`` through WebTorch's proxy (benchmarks/proxy.py's config: round robin, passive
  health, retries, active checks) or nginx ``proxy_pass`` (same), to one upstream, an nginx
  ``return 200`` in one process; each proxy keeps as many idle upstream connections as wrk opens.
- train: not measured. With ``workers > 1`` WebTorch refuses training at start (issue 22: one
  trainer per model across workers is the next step); with 1 it is benchmarks/train.py's figure.

Each server runs ``server.workers`` / ``worker_processes`` = 1 or 2 and wrk ``-t1 -cN`` for
``--duration`` s after ``--warmup`` s, all unpinned: on a 2-core machine 2 workers, wrk (and for
the proxy the upstream) share both cores, so 2 workers cannot double 1 worker's req/s here; what
the numbers do show is the CPU each server spends per request (all its processes, /proc) and how
much of the machine it gets. Each figure is the median over ``--rounds`` rounds (each case once
per round, in turn).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import webtorch_harness as harness

ROOT = Path(__file__).resolve().parent.parent
XOR = ROOT / "src" / "webtorch" / "examples" / "xor.py"
PREDICT_BODY = '{"inputs": [[0, 1]]}'
NGINX_BODY = '{"outputs":[[0.9991369843482971]]}'  # XOR's short-form answer, same size


def find(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise SystemExit(f"error: {name} is not installed; run benchmarks/setup")
    return found


def nginx_conf(workdir: Path, name: str, workers: int, server: str, one_process: bool) -> Path:
    conf = workdir / f"{name}.conf"
    conf.write_text(
        "\n".join(
            [
                "daemon off;",
                *(["master_process off;"] if one_process else []),
                f"worker_processes {workers};",
                f"pid {workdir}/{name}.pid;",
                f"error_log {workdir}/{name}-error.log warn;",
                "events { worker_connections 4096; }",
                "http {",
                "    access_log off;",
                *(
                    f"    {kind}_temp_path {workdir}/{name}-{kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
                ),
                "    keepalive_requests 1000000;",
                server,
                "}",
            ]
        )
        + "\n"
    )
    return conf


def nginx(conf: Path, workdir: Path, name: str) -> list[str]:
    return [find("nginx"), "-e", str(workdir / f"{name}-error.log"), "-p", str(workdir), "-c",
            str(conf)]  # fmt: skip


def nginx_return(port: int, workers: int, workdir: Path, name: str, one_process: bool) -> list[str]:
    body = NGINX_BODY.replace("'", "\\'")
    server = textwrap.indent(
        textwrap.dedent(f"""\
        server {{
            listen 127.0.0.1:{port};
            location / {{ default_type application/json; return 200 '{body}'; }}
        }}"""),
        "    ",
    )
    return nginx(nginx_conf(workdir, name, workers, server, one_process), workdir, name)


def nginx_proxy(port: int, upstream: int, pool: int, workers: int, workdir: Path) -> list[str]:
    server = textwrap.indent(
        textwrap.dedent(f"""\
        upstream backend {{
            server 127.0.0.1:{upstream} max_fails=1 fail_timeout=10s;
            keepalive {pool};
        }}
        server {{
            listen 127.0.0.1:{port};
            location / {{
                proxy_pass http://backend;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_set_header Host $host;
                proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
                proxy_set_header X-Forwarded-Proto $scheme;
                proxy_next_upstream error timeout;
                proxy_next_upstream_tries 3;
                proxy_connect_timeout 1s;
                proxy_read_timeout 5s;
            }}
        }}"""),
        "    ",
    )
    return nginx(nginx_conf(workdir, "proxy", workers, server, False), workdir, "proxy")


def webtorch_predict(workers: int) -> str:
    return f'[server]\nworkers = {workers}\n\n[models.xor]\npath = "{XOR}"\n'


def webtorch_proxy(upstream: int, pool: int, workers: int) -> str:
    return textwrap.dedent(f"""\
        [server]
        workers = {workers}

        [upstreams.backend]
        servers = ["127.0.0.1:{upstream}"]
        policy = "round_robin"
        keepalive = {pool}
        connect_timeout = 1.0
        read_timeout = 5.0
        max_fails = 1
        fail_timeout = 10.0

        [upstreams.backend.health_check]
        path = "/health"
        interval = 1.0

        [upstreams.backend.retry]
        tries = 3
        on = ["error", "timeout", "http_502", "http_503", "http_504"]

        [[routes]]
        prefix = "/"
        upstream = "backend"
        """)


@dataclass
class Case:
    workload: str  # predict | proxy
    server: str  # webtorch | nginx
    workers: int
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # server CPU per request
    cores: list[float] = field(default_factory=list)  # server CPU seconds per second
    errors: list[int] = field(default_factory=list)


@contextmanager
def started(case: Case, workdir: Path, connections: int) -> Iterator[tuple[str, list[int]]]:
    """The case's server (and the proxy's upstream), ready: its URL and the pids to measure."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        scratch = Path(tmp)
        upstream: harness.Process | None = None
        try:
            if case.workload == "proxy":
                port = harness.free_port()
                upstream = harness.start(
                    nginx_return(port, 1, scratch, "upstream", one_process=True),
                    port=port, name="upstream",
                )  # fmt: skip
                upstream.wait_http("/")
            if case.server == "webtorch":
                toml = (
                    webtorch_predict(case.workers)
                    if case.workload == "predict"
                    else webtorch_proxy(port, connections, case.workers)
                )
                server: harness.Process = harness.serve(toml=toml, workdir=scratch)
            else:
                sport = harness.free_port()
                argv = (
                    nginx_return(sport, case.workers, scratch, "nginx", one_process=False)
                    if case.workload == "predict"
                    else nginx_proxy(sport, port, connections, case.workers, scratch)
                )
                server = harness.start(argv, port=sport, name="nginx")
                server.wait_http("/", method="POST" if case.workload == "predict" else "GET")
            with server:
                yield server.url, server.pids()
        finally:
            if upstream is not None:
                upstream.close()


def wrk(url: str, connections: int, seconds: int, lua: Path | None) -> tuple[float, int, int]:
    """req/s, requests, errors (non-2xx and socket errors)."""
    argv = [find("wrk"), "-t1", f"-c{connections}", f"-d{seconds}s"]
    if lua is not None:
        argv += ["-s", str(lua)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    assert rps is not None and total is not None, out
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = (int(non_2xx[1]) if non_2xx else 0) + (
        sum(int(n) for n in sockets.groups()) if sockets else 0
    )
    return float(rps[1]), int(total[1]), errors


def measure(case: Case, workdir: Path, args: argparse.Namespace) -> None:
    lua = None
    path = "/"
    if case.workload == "predict":
        lua = workdir / "predict.lua"
        lua.write_text(
            f'wrk.method = "POST"\nwrk.body = {json.dumps(PREDICT_BODY)}\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        path = "/models/xor/predict" if case.server == "webtorch" else "/"
    with started(case, workdir, args.connections) as (url, pids):
        wrk(url + path, args.connections, args.warmup, lua)
        before, start = harness.cpu_times(pids).total, time.monotonic()
        rps, requests, errors = wrk(url + path, args.connections, args.duration, lua)
        cpu, elapsed = harness.cpu_times(pids).total - before, time.monotonic() - start
    case.rps.append(rps)
    case.cpu_us.append(cpu / max(requests, 1) * 1e6)
    case.cores.append(cpu / elapsed)
    case.errors.append(errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    cases = [
        Case(workload, server, workers)
        for workload in ("predict", "proxy")
        for server in ("nginx", "webtorch")
        for workers in (1, 2)
    ]
    with tempfile.TemporaryDirectory(prefix="webtorch-workers-") as tmp:
        for round_ in range(args.rounds):
            for case in cases:
                measure(case, Path(tmp), args)
                print(f"round {round_ + 1}: {case.workload} {case.server} x{case.workers}: "
                      f"{case.rps[-1]:,.0f} req/s, {case.cpu_us[-1]:.1f} us CPU/request",
                      file=sys.stderr, flush=True)  # fmt: skip
    median: Callable[[list[float]], float] = statistics.median
    print("| workload | server | workers | req/s | server CPU us/request | cores used by the "
          "server | errors |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for case in cases:
        print(
            f"| {case.workload} | {case.server} | {case.workers} | {median(case.rps):,.0f} | "
            f"{median(case.cpu_us):.1f} | {median(case.cores):.2f} | {sum(case.errors)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
