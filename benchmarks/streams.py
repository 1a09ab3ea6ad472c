"""Streams: N concurrent WebSocket streams at 50 items/s each against the activity example
(src/webtorch/examples/activity: a 1D-conv over the last 50 samples, answered every 10th),
served by WebTorch (windows of all streams batched into one forward pass) and by FastAPI +
uvicorn running torch per message (benchmarks/streams_fastapi.py), in the same run.

    .venv/bin/python benchmarks/streams.py [--streams 100,1000] [--duration 10] [--output FILE]
        [--per-message 5] [--form binary] [--servers webtorch,fastapi,sink] [--rate 50]
    .venv/bin/python benchmarks/streams.py --proxy 100 [--duration 10]

Each server runs on CPU 0 (taskset), the load on CPU 1 (this process: benchmarks/ws_load.py,
one uvloop loop writing frames masked before the run), ``OMP_NUM_THREADS=1``. Items carry no
id (the server numbers them), so an item's message is the same bytes every time round.
``--servers sink`` offers the load to a server that drops it (benchmarks/ws_sink.py): the load
generator's own ceiling. Per server and stream count:

- offered items/s: items the load wrote in the measured window (N x rate when it keeps up);
- items/s: items the server took: its answers in the window x 10 (one answer per 10 items;
  items written are not counted, since the sockets' kernel buffers hold many seconds of a
  stream's bytes: a server that falls behind shows it here, and in the latency);
- p50/p99 per-item latency: from sending the item that completes a window to its answer;
- CPU per item: the server's CPU time (user + system) in the window / items it took; in
  brackets, the system (kernel) part of it;
- memory per stream: the server's RSS with the N streams open (before any item) minus before
  they opened, / N; and how much more it grew while they ran (allocator caches, buffers), / N;
- load CPU / lag / skipped: the share of its core the load used, how late it ran against its
  schedule at most, and sends skipped because a socket pushed back (the server not reading).

With ``--proxy N``: WebSocket proxying instead, nginx (one worker, the usual Upgrade/Connection
map) against WebTorch (a route with ``websocket = true``), each on CPU 0, in front of a
websockets echo server (benchmarks/ws_echo.py) that shares CPU 1 with the load: N connections
each sending 100 bytes and awaiting the echo in a loop; the proxy's CPU time per round trip
(one message each way).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import orjson
import uvloop
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ws_load

import webtorch_harness as harness
from webtorch.examples.activity.data import stream

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "src" / "webtorch" / "examples" / "activity"
RATE, WINDOW, EVERY = 50, 50, 10
ENV = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
if "ONEDNN_PRIMITIVE_CACHE_CAPACITY" in os.environ:  # oneDNN keeps a primitive per batch shape
    ENV["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]


@dataclass
class Result:
    server: str
    streams: int
    items_per_s: float
    offered: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_item: float
    sys_us_per_item: float  # of which the kernel's (system time)
    kib_per_stream: float
    kib_growth: float
    errors: int
    load_cpu: float  # % of its core the load generator used
    load_lag_ms: float  # how late the load ran against its schedule, at most
    skipped: int  # sends skipped because the server pushed back

    def row(self) -> str:
        return (
            f"| {self.server} | {self.streams} | {self.offered:.0f} | {self.items_per_s:.0f} | "
            f"{self.p50_ms:.1f} | {self.p99_ms:.1f} | "
            f"{self.cpu_us_per_item:.1f} ({self.sys_us_per_item:.1f}) | "
            f"{self.kib_per_stream:.1f} | {self.kib_growth:.0f} | {self.errors} | "
            f"{self.load_cpu:.0f}% / {self.load_lag_ms:.0f} ms / {self.skipped} |"
        )


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cycles(n: int, per_message: int, form: str) -> list[list[bytes]]:
    """One cycle of a device's messages per data set (60 s of samples, at most 10 sets): JSON
    ``{"x": [ax, ay, az]}`` (no id: the server numbers items in arrival order), a JSON array
    of ``per_message`` of them, or ``binary``: float32 little-endian rows."""
    out = []
    for seed in range(min(n, 10)):
        samples = stream(60, np.random.default_rng(seed))[0]
        groups = [samples[j : j + per_message] for j in range(0, len(samples), per_message)]
        if form == "binary":
            out.append(ws_load.binary_frames([g.astype("<f4").tobytes() for g in groups]))
        elif per_message == 1:
            out.append(ws_load.text_frames([orjson.dumps({"x": g[0].tolist()}) for g in groups]))
        else:
            docs = [orjson.dumps([{"x": row.tolist()} for row in g]) for g in groups]
            out.append(ws_load.text_frames(docs))
    return out


async def measure(
    name: str,
    proc: harness.Process,
    url: str,
    n: int,
    duration: float,
    per_message: int = 1,
    form: str = "json",
    rate: float = RATE,
) -> Result:
    base = rss_kib(proc.pids())
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    load = ws_load.Load(
        parts.hostname,
        parts.port,
        parts.path + (f"?{parts.query}" if parts.query else ""),
        n,
        cycles(n, per_message, form),
        per_message,
        rate,
        WINDOW,
        EVERY,
    )
    await load.open()
    opened = rss_kib(proc.pids())
    await load.run(2.0)  # warm up: windows fill, batches find their size
    load.measuring = True
    load.lag = 0.0
    cpu0 = proc.cpu_times()
    own0 = resource.getrusage(resource.RUSAGE_SELF)
    sent0, skipped0, answers0 = load.sent, load.skipped, load.answers
    t0 = time.perf_counter()
    await load.run(duration)
    elapsed = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF)
    cpu = proc.cpu_times()
    # What the server took is what it answered (an answer per EVERY items): items written are
    # not, since the sockets' kernel buffers hold many seconds of a stream's bytes.
    items = (load.answers - answers0) * EVERY
    if name.startswith("sink"):  # it answers nothing: what it took is what was written
        items = load.sent - sent0
    rss = rss_kib(proc.pids())
    await load.close()
    lat = np.array(load.latencies or [float("nan")]) * 1000
    busy = (cpu.user + cpu.system) - (cpu0.user + cpu0.system)
    load_busy = (own.ru_utime + own.ru_stime) - (own0.ru_utime + own0.ru_stime)
    return Result(
        name,
        n,
        items / elapsed,
        (load.sent - sent0) / elapsed,
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 99)),
        busy / max(items, 1) * 1e6,
        (cpu.system - cpu0.system) / max(items, 1) * 1e6,
        (opened - base) / n,
        (rss - opened) / n,
        load.errors,
        load_busy / elapsed * 100,
        load.lag * 1000,
        load.skipped - skipped0,
    )


def webtorch_server(workdir: Path) -> tuple[harness.Server, str]:
    toml = f'[models.activity]\npath = "{EXAMPLE / "activity.py"}"\n\n[streams]\n'
    server = harness.serve(toml=toml, env=ENV, cpus="0", workdir=workdir / "webtorch")
    return server, f"ws://127.0.0.1:{server.port}/v2/models/activity/stream"


def fastapi_server(workdir: Path) -> tuple[harness.Process, str]:
    port = harness.free_port()
    proc = harness.start(
        [sys.executable, str(ROOT / "benchmarks" / "streams_fastapi.py"), "--port", str(port)],
        env=ENV,
        cpus="0",
        port=port,
        name="fastapi",
        log=workdir / "fastapi.log",
    )
    proc.wait_http("/v2/health/ready")
    return proc, f"ws://127.0.0.1:{port}/v2/models/activity/stream"


def sink_server(workdir: Path) -> tuple[harness.Process, str]:
    port = harness.free_port()
    proc = harness.start(
        [sys.executable, str(ROOT / "benchmarks" / "ws_sink.py"), "--port", str(port)],
        env=ENV,
        cpus="0",
        name="sink",
        log=workdir / "sink.log",
    )
    proc.wait_log(r"listening on")
    return proc, f"ws://127.0.0.1:{port}/v2/models/activity/stream"


SERVERS = {
    "webtorch": ("WebTorch", webtorch_server),
    "fastapi": ("FastAPI + uvicorn", fastapi_server),
    "sink": ("sink (the load's ceiling)", sink_server),
}


# -- proxying: WebTorch's tunnels against nginx's, CPU per message ----------------------------


def nginx_proxy(workdir: Path, port: int, upstream: int) -> list[str]:
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""
    )
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin") or "nginx"
    return [nginx, "-e", str(workdir / "nginx-error.log"), "-p", str(workdir), "-c", str(conf)]


async def echo_load(url: str, n: int, seconds: float, proc: harness.Process) -> tuple[int, float]:
    """N connections, each sending a 100-byte message and awaiting its echo, in a loop: the
    messages echoed in ``seconds`` and the proxy's CPU seconds meanwhile."""
    sockets = [await connect(url, compression=None) for _ in range(n)]
    payload = "m" * 100
    stop = False
    count = 0

    async def one(ws: ClientConnection) -> None:
        nonlocal count
        while not stop:
            await ws.send(payload)
            await ws.recv()
            count += 1

    tasks = [asyncio.create_task(one(ws)) for ws in sockets]
    await asyncio.sleep(1.0)  # warm up
    cpu0, count0 = proc.cpu_times(), count
    await asyncio.sleep(seconds)
    cpu1, count1 = proc.cpu_times(), count
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    busy = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return count1 - count0, busy


def proxy_rows(workdir: Path, n: int, seconds: float) -> list[str]:
    up_port = harness.free_port()
    upstream = harness.start(
        [sys.executable, str(ROOT / "benchmarks" / "ws_echo.py"), "--port", str(up_port)],
        env=ENV,
        cpus="1",
        name="echo",
        log=workdir / "echo.log",
    )
    rows = []
    try:
        upstream.wait_log(r"listening on")
        for name in ("nginx", "WebTorch"):
            if name == "nginx":
                port = harness.free_port()
                proc: harness.Process = harness.start(
                    nginx_proxy(workdir, port, up_port), cpus="0", port=port, name="nginx"
                )
                proc.wait_http("/", ready=lambda status, body: True)  # any answer: it listens
                url = f"ws://127.0.0.1:{port}/echo"
            else:
                toml = (
                    f'[upstreams.echo]\nservers = ["127.0.0.1:{up_port}"]\n\n'
                    '[[routes]]\nprefix = "/"\nupstream = "echo"\nwebsocket = true\n\n'
                    "[streams]\n"
                )
                proc = harness.serve(toml=toml, env=ENV, cpus="0", workdir=workdir / "proxy")
                url = f"ws://127.0.0.1:{proc.port}/echo"
            try:
                messages, busy = asyncio.run(echo_load(url, n, seconds, proc))
            finally:
                proc.close()
            rows.append(
                f"| {name} | {n} | {messages / seconds:.0f} | {busy / max(messages, 1) * 1e6:.1f} |"
            )
            print(rows[-1], flush=True)
    finally:
        upstream.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="100,200")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--proxy", type=int, default=0, help="N echo connections: proxy CPU")
    parser.add_argument(
        "--per-message", type=int, default=1, help="items per message (WebTorch only: a JSON array)"
    )
    parser.add_argument(
        "--form", choices=("json", "binary"), default="json", help="binary: float32 rows"
    )
    parser.add_argument("--rate", type=float, default=RATE, help="items/s per stream")
    parser.add_argument("--servers", default="webtorch,fastapi", help="webtorch,fastapi,sink")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})  # the load on CPU 1; the servers on CPU 0
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"webtorch-streams-{os.getpid()}"
    workdir.mkdir(parents=True)
    (workdir / "webtorch").mkdir()
    (workdir / "proxy").mkdir()
    if args.proxy:
        table = "\n".join(
            [
                "| proxy | connections | messages/s | proxy CPU us/message |",
                "|---|---|---|---|",
                *proxy_rows(workdir, args.proxy, args.duration),
            ]
        )
        print(table)
        if args.output is not None:
            args.output.write_text(table + "\n")
        return
    rows = []
    for n in (int(s) for s in args.streams.split(",")):
        servers = [SERVERS[name] for name in args.servers.split(",")]
        if args.per_message > 1 or args.form != "json":
            # the FastAPI endpoint takes one JSON item per message
            servers = [s for s in servers if s[0] != "FastAPI + uvicorn"]
        for name, make in servers:
            proc, url = make(workdir)
            label = name
            if args.per_message > 1:
                label += f", {args.per_message} per message"
            if args.form != "json":
                label += f", {args.form}"
            try:
                result = uvloop.run(
                    measure(
                        label, proc, url, n, args.duration, args.per_message, args.form, args.rate
                    )
                )
            finally:
                proc.close()
            print(result.row(), flush=True)
            rows.append(result.row())
    table = "\n".join(
        [
            "| server | streams | offered items/s | items/s | p50 ms | p99 ms "
            "| CPU us/item (system) | KiB/stream open | KiB/stream RSS growth | errors "
            "| load CPU / lag / skipped |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.output is not None:
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
