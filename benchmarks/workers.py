"""WebTorch with 1 and 2 workers against nginx with 1 and 2 workers, same run: predict and proxy;
WebTorch's training (WAL) with 1 and 2 workers, and how far behind the newest weights a worker
that does not train answers.

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/workers.py [--duration 5] [--warmup 2]
        [--rounds 2] [--connections 64] [--workloads predict,proxy,train]

- predict: WebTorch serving XOR (``POST /models/xor/predict``), nginx ``return 200`` with the
  same answer (what benchmarks/run.py compares: nginx's figure is the HTTP ceiling, not a model).
- proxy: ``GET /`` through WebTorch's proxy (benchmarks/proxy.py's config: round robin, passive
  health, retries, active checks) or nginx ``proxy_pass`` (same), to one upstream, an nginx
  ``return 200`` in one process; each proxy keeps as many idle upstream connections as wrk opens.
- train: ``POST /models/xor/train``, one example per request, ``durability = "wal"`` (each
  step fsynced before its answers), WebTorch only. With 2 workers one of them trains and the
  other forwards its share of the requests over a unix socket (issue 22 part 2).
- lag (2 workers): while wrk trains as above, one keep-alive client predicts back to back on
  the worker that does not train. For each answer: how many versions the trainer had published
  beyond the one it carries (``webtorch-model-version``) when it arrived, and for how long the
  first of them had been out (read from the shared weights' header, polled by a thread).

Each server runs ``server.workers`` / ``worker_processes`` = 1 or 2 and wrk ``-t1 -cN`` for
``--duration`` s after ``--warmup`` s, all unpinned: on a 2-core machine 2 workers, wrk (and for
the proxy the upstream) share both cores, so 2 workers cannot double 1 worker's req/s here; what
the numbers do show is the CPU each server spends per request (all its processes, /proc) and how
much of the machine it gets. Each figure is the median over ``--rounds`` rounds (each case once
per round, in turn).
"""

from __future__ import annotations

import argparse
import http.client
import json
import mmap
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import webtorch_harness as harness

ROOT = Path(__file__).resolve().parent.parent
XOR = ROOT / "src" / "webtorch" / "examples" / "xor.py"
PREDICT_BODY = '{"inputs": [[0, 1]]}'
TRAIN_BODY = '{"inputs": [[0, 1]], "targets": [[1]]}'
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


def webtorch_train(workers: int, state: Path) -> str:
    return textwrap.dedent(f"""\
        [server]
        workers = {workers}

        [models.xor]
        path = "{XOR}"

        [models.xor.train]
        enabled = true
        durability = "wal"
        state_dir = "{state}"
        """)


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
    workload: str  # predict | proxy | train
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
                if case.workload == "predict":
                    toml = webtorch_predict(case.workers)
                elif case.workload == "train":
                    toml = webtorch_train(case.workers, scratch / "state")
                else:
                    toml = webtorch_proxy(port, connections, case.workers)
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
    if case.workload in ("predict", "train"):
        lua = workdir / f"{case.workload}.lua"
        body = PREDICT_BODY if case.workload == "predict" else TRAIN_BODY
        lua.write_text(
            f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        path = f"/models/xor/{case.workload}" if case.server == "webtorch" else "/"
    with started(case, workdir, args.connections) as (url, pids):
        wrk(url + path, args.connections, args.warmup, lua)
        before, start = harness.cpu_times(pids).total, time.monotonic()
        rps, requests, errors = wrk(url + path, args.connections, args.duration, lua)
        cpu, elapsed = harness.cpu_times(pids).total - before, time.monotonic() - start
    case.rps.append(rps)
    case.cpu_us.append(cpu / max(requests, 1) * 1e6)
    case.cores.append(cpu / elapsed)
    case.errors.append(errors)


HEADER = struct.Struct("<Qqd16s")  # serve/versions.py's: seq, version, published, fingerprint


def shared_weights(after: float) -> Path:
    """The weights file of the master started last (its private directory under /dev/shm)."""
    found = [
        path
        for path in Path("/dev/shm").glob("webtorch-*/weights-xor")
        if path.stat().st_mtime >= after
    ]
    if not found:
        raise SystemExit("error: no shared weights under /dev/shm")
    return max(found, key=lambda path: path.stat().st_mtime)


def other_worker(url: str) -> http.client.HTTPConnection:
    """A keep-alive connection to worker 1 (the one that does not train XOR)."""
    host, port = url.removeprefix("http://").split(":")
    for _ in range(200):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        if re.search(r'webtorch_worker\{pid="\d+",slot="1"\} 1\.0', text):
            return conn
        conn.close()
    raise SystemExit("error: no connection reached worker 1")


def lag(workdir: Path, args: argparse.Namespace) -> tuple[list[int], list[float], int]:
    """With 2 workers under wrk's train load: per prediction answered by worker 1, the versions
    it was behind and for how many ms the first newer one had been out; and the steps taken."""
    case = Case("train", "webtorch", 2)
    published: dict[int, float] = {}  # version -> when it was published (time.monotonic)
    behind: list[int] = []
    late_ms: list[float] = []
    start = time.time() - 1
    with started(case, workdir, args.connections) as (url, _):
        memory = mmap.mmap(os.open(shared_weights(start), os.O_RDONLY), HEADER.size,
                           prot=mmap.PROT_READ)  # fmt: skip
        stop = threading.Event()

        def watch() -> None:  # every version as it comes out (a step takes far longer)
            while not stop.is_set():
                seq, version, at, _ = HEADER.unpack_from(memory, 0)
                if seq % 2 == 0 and version not in published:
                    published[version] = at
                time.sleep(0.0005)  # a poll, not a wait: 0.5 ms is the figure's resolution

        watcher = threading.Thread(target=watch)
        watcher.start()
        conn = other_worker(url)
        load = threading.Thread(
            target=wrk, args=(url + "/models/xor/train", args.connections, args.duration,
                              workdir / "train.lua"),
        )  # fmt: skip
        load.start()
        try:
            while load.is_alive():
                conn.request("POST", "/models/xor/predict", PREDICT_BODY,
                             {"content-type": "application/json"})  # fmt: skip
                reply = conn.getresponse()
                reply.read()
                now = time.monotonic()
                version = int(reply.getheader("webtorch-model-version", "-1"))
                newest = HEADER.unpack_from(memory, 0)[1]
                behind.append(max(0, newest - version))
                first_newer = published.get(version + 1)
                late_ms.append(
                    (now - first_newer) * 1e3
                    if first_newer is not None and newest > version
                    else 0.0
                )
        finally:
            load.join()
            stop.set()
            watcher.join()
            conn.close()
        steps = HEADER.unpack_from(memory, 0)[1]
        memory.close()
    return behind, late_ms, steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--workloads", default="predict,proxy,train", help="comma-separated: predict,proxy,train"
    )
    args = parser.parse_args()
    chosen = args.workloads.split(",")
    cases = [
        Case(workload, server, workers)
        for workload in ("predict", "proxy")
        if workload in chosen
        for server in ("nginx", "webtorch")
        for workers in (1, 2)
    ] + [Case("train", "webtorch", workers) for workers in (1, 2) if "train" in chosen]
    behind: list[int] = []
    late_ms: list[float] = []
    answers = steps = 0
    with tempfile.TemporaryDirectory(prefix="webtorch-workers-") as tmp:
        for round_ in range(args.rounds):
            for case in cases:
                measure(case, Path(tmp), args)
                print(f"round {round_ + 1}: {case.workload} {case.server} x{case.workers}: "
                      f"{case.rps[-1]:,.0f} req/s, {case.cpu_us[-1]:.1f} us CPU/request",
                      file=sys.stderr, flush=True)  # fmt: skip
            if "train" not in chosen:
                continue
            lagged = lag(Path(tmp), args)
            behind += lagged[0]
            late_ms += lagged[1]
            answers += len(lagged[0])
            steps += lagged[2]
    median: Callable[[list[float]], float] = statistics.median
    print("| workload | server | workers | req/s | server CPU us/request | cores used by the "
          "server | errors |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for case in cases:
        print(
            f"| {case.workload} | {case.server} | {case.workers} | {median(case.rps):,.0f} | "
            f"{median(case.cpu_us):.1f} | {median(case.cores):.2f} | {sum(case.errors)} |"
        )
    if "train" not in chosen:
        return 0
    print(f"\nlag (2 workers, {answers} predictions on worker 1 during {steps} train steps):")
    print("| | p50 | p99 | max |\n|---|---:|---:|---:|")
    for name, values in (("versions behind", [float(b) for b in behind]), ("ms behind", late_ms)):
        ordered = sorted(values) or [0.0]
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        print(f"| {name} | {ordered[len(ordered) // 2]:.2f} | {p99:.2f} | {ordered[-1]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
