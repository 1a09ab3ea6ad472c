"""Streams: N concurrent WebSocket streams at 50 items/s each against the activity example
(src/webtorch/examples/activity: a 1D-conv over the last 50 samples, answered every 10th),
served by WebTorch (windows of all streams batched into one forward pass) and by FastAPI +
uvicorn running torch per message (benchmarks/streams_fastapi.py), in the same run.

    .venv/bin/python benchmarks/streams.py [--streams 100,200] [--duration 10] [--output FILE]
    .venv/bin/python benchmarks/streams.py --proxy 100 [--duration 10]

Each server runs on CPU 0 (taskset), the load on CPU 1 (this process: one asyncio loop, the
websockets client), so that the two do not share a core. Per server and stream count:

- items/s: items the server took in the measured window (offered: N x 50/s; a server that
  falls behind slows its clients through backpressure, so what it takes is what it sustains);
- p50/p99 per-item latency: from sending the item that completes a window to its answer;
- CPU per item: the server's CPU time (user + system) in the window / items;
With ``--proxy N``: WebSocket proxying instead, nginx (one worker, the usual Upgrade/Connection
map) against WebTorch (a route with ``websocket = true``), each on CPU 0, in front of a
websockets echo server (benchmarks/ws_echo.py) that shares CPU 1 with the load: N connections
each sending 100 bytes and awaiting the echo in a loop; the proxy's CPU time per round trip
(one message each way).

- memory per stream: the server's RSS with the N streams open (before any item) minus before
  they opened, / N; and how much more it grew while they ran (allocator caches, buffers), / N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

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
    kib_per_stream: float
    kib_growth: float
    errors: int

    def row(self) -> str:
        return (
            f"| {self.server} | {self.streams} | {self.offered:.0f} | {self.items_per_s:.0f} | "
            f"{self.p50_ms:.1f} | {self.p99_ms:.1f} | {self.cpu_us_per_item:.0f} | "
            f"{self.kib_per_stream:.1f} | {self.kib_growth:.0f} | {self.errors} |"
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


class Load:
    """N streams, each sending its samples at 50/s in ticks of 5, reading answers."""

    def __init__(self, url: str, n: int, per_message: int = 1) -> None:
        self.url = url
        self.n = n
        self.per_message = per_message
        self.sockets: list[ClientConnection] = []
        self.data = [stream(60, np.random.default_rng(seed))[0] for seed in range(min(n, 50))]
        self.sent = 0
        self.latencies: list[float] = []
        self.errors = 0
        self.measuring = False
        self._sent_at: list[dict[int, float]] = []

    async def open(self) -> None:
        for _i in range(self.n):
            ws = await connect(self.url, max_size=1 << 20, compression=None)
            await ws.recv()  # the stream's name
            self.sockets.append(ws)
            self._sent_at.append({})
        self._readers = [
            asyncio.create_task(self._read(ws, self._sent_at[i]))
            for i, ws in enumerate(self.sockets)
        ]

    async def _read(self, ws: ClientConnection, sent_at: dict[int, float]) -> None:
        async for message in ws:
            answer = json.loads(message)
            at = sent_at.pop(answer.get("id", -1), None)
            if "error" in answer:
                self.errors += 1
            elif at is not None and self.measuring:
                self.latencies.append(time.perf_counter() - at)

    async def run(self, seconds: float) -> None:
        """Every 0.1 s, 5 samples on each stream (stream i starts its ticks i/N of a tick
        later: devices are not in step)."""
        start = time.perf_counter()
        ticks = int(seconds * 10)
        counts = [0] * self.n
        for tick in range(ticks):
            await asyncio.sleep(max(0.0, start + tick / 10 - time.perf_counter()))
            for i, ws in enumerate(self.sockets):
                samples = self.data[i % len(self.data)]
                batch = []
                for _ in range(RATE // 10):
                    k = counts[i]
                    counts[i] += 1
                    x = samples[k % len(samples)].tolist()
                    if k + 1 >= WINDOW and (k + 1 - WINDOW) % EVERY == 0:
                        self._sent_at[i][k] = time.perf_counter()
                    batch.append({"id": k, "x": x})
                    if len(batch) == self.per_message:
                        await ws.send(json.dumps(batch if self.per_message > 1 else batch[0]))
                        batch = []
                    self.sent += 1
                if batch:
                    await ws.send(json.dumps(batch if self.per_message > 1 else batch[0]))

    async def close(self) -> None:
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)


async def measure(
    name: str, proc: harness.Process, url: str, n: int, duration: float, per_message: int = 1
) -> Result:
    base = rss_kib(proc.pids())
    load = Load(url, n, per_message)
    await load.open()
    opened = rss_kib(proc.pids())
    await load.run(2.0)  # warm up: windows fill, batches find their size
    load.measuring = True
    cpu0 = proc.cpu_times()
    sent0 = load.sent
    t0 = time.perf_counter()
    await load.run(duration)
    elapsed = time.perf_counter() - t0
    cpu = proc.cpu_times()
    items = load.sent - sent0
    rss = rss_kib(proc.pids())
    await load.close()
    lat = np.array(load.latencies or [float("nan")]) * 1000
    busy = (cpu.user + cpu.system) - (cpu0.user + cpu0.system)
    return Result(
        name,
        n,
        items / elapsed,
        n * RATE,
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 99)),
        busy / max(items, 1) * 1e6,
        (opened - base) / n,
        (rss - opened) / n,
        load.errors,
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
        servers = [("WebTorch", webtorch_server), ("FastAPI + uvicorn", fastapi_server)]
        if args.per_message > 1:
            servers = servers[:1]  # the FastAPI endpoint takes one item per message
        for name, make in servers:
            proc, url = make(workdir)
            label = name if args.per_message == 1 else f"{name}, {args.per_message} per message"
            try:
                result = asyncio.run(measure(label, proc, url, n, args.duration, args.per_message))
            finally:
                proc.close()
            print(result.row(), flush=True)
            rows.append(result.row())
    table = "\n".join(
        [
            "| server | streams | offered items/s | items/s | p50 ms | p99 ms | CPU us/item "
            "| KiB/stream open | KiB/stream RSS growth | errors |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.output is not None:
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
