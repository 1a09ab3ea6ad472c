"""The pipeline argument, measured (issue 21): the text classifier of examples/textcls (clean ->
featurize -> network -> label) served four ways, one after the other in this one run:

  (a) WebTorch, one process          examples/textcls/pipeline.toml
  (b) WebTorch, each stage a service examples/textcls/split.toml: a front server and one
                                     `webtorch serve split.toml --stages S` per stage
  (c) FastAPI microservices          benchmarks/pipeline_fastapi.py: a gateway and one uvicorn
                                     process per stage, JSON and pydantic between them
  (d) Ray Serve composition          benchmarks/pipeline_ray.py: one deployment per stage, an
                                     ingress calling them through handles

    .venv/bin/python benchmarks/pipeline.py [--duration S] [--targets a,b,c,d] [--sizes 2KB,50KB]
        [--output FILE] [--quick]

Every client request is the same: one dirty web page of the example's generator (2 KB or 50 KB)
as ``{"records": ["<html>..."]}``, answered with the label and scores. Per target and size: a
closed loop (``--connections`` clients, as fast as answered: throughput), then open loops at
fixed rates (latency counted from when each request was due). CPU per request: the CPU seconds of
every process of the target (each child's session: workers, stage services, Ray's raylet, GCS
and replicas) over the phase, divided by the requests answered. The load generator is this
process; its own CPU is reported beside (it shares the machine's cores with the servers, which
nothing is pinned to). Boundaries: what each approach's own instruments measured per stage hop
(serialize, transfer, deserialize, bytes), at the lowest open-loop rate. The table replaces the
section between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import pickle
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pipeline_load as load

import webtorch_harness as harness
from webtorch.examples.textcls import data, stages

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
EXAMPLE = ROOT / "src" / "webtorch" / "examples" / "textcls"
MARK_START = "<!-- pipeline:start -->"
MARK_END = "<!-- pipeline:end -->"
SIZES = {"2KB": data.SMALL, "50KB": data.LARGE}
# Open-loop rates (requests/s), the same for every target: a light load every approach carries,
# and a heavier one that separates them.
RATES = {"2KB": (20.0, 50.0), "50KB": (5.0, 15.0)}
DOCUMENTS = 64  # distinct documents per size, sent in turn
START_TIMEOUT = 180.0  # Ray starts a cluster, a controller, a proxy and five replicas
STATS_TIMEOUT = 60.0  # an overloaded target answers its stats late
IDLE = 0.05  # cores: a target below this is idle again after a phase (its queues drained)
SETTLE_TIMEOUT = 120.0  # seconds a target gets to drain what an overload left queued
# Every process of every target: one thread for torch's intra-op pool (two shared cores).
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


class BenchError(Exception):
    pass


@dataclass
class Phase:
    name: str  # "closed" | "open 20/s"
    result: load.Result
    server_cpu: float  # seconds, all the target's processes
    client_cpu: float  # seconds, this process
    boundaries: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.server_cpu / self.result.ok if self.result.ok else float("nan")


@dataclass
class Running:
    """A started target: where to send, what to count, how to read its boundary costs."""

    port: int
    path: str
    processes: list[harness.Process]
    boundaries: Callable[[], dict[str, dict[str, float]]]
    idle: float = 0.0  # cores used with no load

    def cpu(self) -> float:
        pids: set[int] = set()
        for p in self.processes:
            pids.update(p.pids())
            pids.update(_descendants(p.pid))
        return harness.cpu_times(pids).total


def _descendants(root: int) -> set[int]:
    # Processes that left the session (Ray's daemons may start sessions of their own) but are
    # still children of the target's tree.
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        for child in parents.get(pid, []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=STATS_TIMEOUT) as r:
        return json.loads(r.read())


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=STATS_TIMEOUT) as r:
        return r.read().decode()


# -- targets ----------------------------------------------------------------------------------


def _webtorch_boundaries(urls: dict[str, str]) -> Callable[[], dict[str, dict[str, float]]]:
    """Per stage from the front server's /metrics: its time in the stage, and for a remote one
    the placement's serialize / transfer / deserialize and bytes (pipeline/remote.py)."""
    front = urls["front"]
    last: dict[str, dict[str, float]] = {}

    def read() -> dict[str, dict[str, float]]:
        text = _get_text(front + "/metrics")
        now: dict[str, dict[str, float]] = {}
        pattern = re.compile(r"^(webtorch_pipeline_\w+?)(_sum|_count|_total)?\{([^}]*)\} (\S+)$")
        for line in text.splitlines():
            m = pattern.match(line)
            if not m:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[3]))
            stage = labels.get("stage")
            if stage is None:
                continue
            key = (
                m[1]
                + (m[2] or "")
                + "".join(f":{labels[k]}" for k in ("part", "direction") if k in labels)
            )
            now.setdefault(stage, {})[key] = float(m[4])
        delta = {
            s: {k: v - last.get(s, {}).get(k, 0.0) for k, v in vals.items()}
            for s, vals in now.items()
        }
        last.clear()
        last.update(now)
        return delta

    return read


def start_webtorch(split: bool, workdir: Path, stack: ExitStack) -> Running:
    """(a) pipeline.toml as shipped; (b) split.toml as its README starts it (one stage server
    per remote stage, then the front), on free ports."""
    processes = []
    config = EXAMPLE / "pipeline.toml"
    if split:
        text = (EXAMPLE / "split.toml").read_text()
        for name in ("model.py", "textcls.py"):
            text = text.replace(f'path = "{name}"', f'path = "{EXAMPLE / name}"')
        ports = {}
        for stage, group in (("clean", "cleaners"), ("featurize", "featurizers"),
                             ("label", "labellers")):  # fmt: skip
            ports[stage] = harness.free_port()
            text = re.sub(
                rf'(\[upstreams\.{group}\]\nservers = \[)"127\.0\.0\.1:\d+"',
                rf'\g<1>"127.0.0.1:{ports[stage]}"',
                text,
            )
        config = workdir / "split.toml"
        config.write_text(text)
        for stage, port in ports.items():
            (workdir / stage).mkdir()
            proc = harness.serve(
                config,
                "--stages",
                stage,
                listen=f"127.0.0.1:{port}",
                workdir=workdir / stage,
                env=ENV,
                ready_path="/v2/health/ready",
                timeout=START_TIMEOUT,
            )
            stack.callback(proc.close)
            processes.append(proc)
    front = harness.serve(
        config, workdir=workdir, env=ENV, ready_path="/v2/health/ready", timeout=START_TIMEOUT
    )
    stack.callback(front.close)
    processes.append(front)
    assert front.port is not None
    return Running(
        front.port,
        "/pipelines/textcls/predict",
        processes,
        _webtorch_boundaries({"front": front.url}),
    )


def start_fastapi(workdir: Path, stack: ExitStack) -> Running:
    processes, urls = [], []
    script = str(BENCH / "pipeline_fastapi.py")
    for role in ("clean", "featurize", "model", "label"):
        port = harness.free_port()
        proc = harness.start(
            [sys.executable, script, "--role", role, "--port", str(port)],
            env=ENV,
            port=port,
            name=f"fastapi {role}",
            log=workdir / f"{role}.log",
        )
        stack.callback(proc.close)
        processes.append(proc)
        urls.append(proc.url)
    port = harness.free_port()
    gateway = harness.start(
        [
            sys.executable,
            script,
            "--role",
            "gateway",
            "--port",
            str(port),
            "--stages",
            ",".join(urls),
        ],
        env=ENV,
        port=port,
        name="fastapi gateway",
        log=workdir / "gateway.log",
    )
    stack.callback(gateway.close)
    processes.append(gateway)
    for proc in processes:
        proc.wait_http("/docs", timeout=START_TIMEOUT)

    def boundaries() -> dict[str, dict[str, float]]:
        return _get_json(gateway.url + "/stats?reset=1")  # type: ignore[no-any-return]

    return Running(port, "/predict", processes, boundaries)


def start_ray(workdir: Path, stack: ExitStack) -> Running:
    port = harness.free_port()
    # Ray's logs and sockets: removed after the stop (callbacks run last first), since the
    # script's own removal is cut short when its shutdown outlasts the stop's grace.
    scratch: list[str] = []
    stack.callback(lambda: [shutil.rmtree(path, ignore_errors=True) for path in scratch])
    proc = harness.start(
        [sys.executable, str(BENCH / "pipeline_ray.py"), "--port", str(port), "--num-cpus", "2"],
        env=ENV,
        port=port,
        name="ray serve",
        log=workdir / "ray.log",
    )
    stack.callback(proc.close)
    scratch.append(proc.wait_log(re.compile(r"ray scratch (\S+)"), START_TIMEOUT)[1])
    proc.wait_log(re.compile(r"ray serve listening"), START_TIMEOUT)

    def boundaries() -> dict[str, dict[str, float]]:
        return _get_json(proc.url + "/stats?reset=1")  # type: ignore[no-any-return]

    return Running(port, "/predict", [proc], boundaries)


TARGETS: dict[str, tuple[str, Callable[[Path, ExitStack], Running]]] = {
    "a": ("WebTorch, one process", lambda w, s: start_webtorch(False, w, s)),
    "b": (
        "WebTorch, split (3 stage services + front with the model)",
        lambda w, s: start_webtorch(True, w, s),
    ),
    "c": ("FastAPI microservices (gateway + 4, JSON)", start_fastapi),
    "d": ("Ray Serve composition (ingress + 4 deployments)", start_ray),
}


# -- measuring --------------------------------------------------------------------------------


def _client_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _bodies(size: int, count: int = DOCUMENTS) -> list[bytes]:
    return [json.dumps({"records": [d.text]}).encode() for d in data.documents(count, 7, size)]


def measure(
    running: Running, size_name: str, args: argparse.Namespace
) -> tuple[list[Phase], list[bytes]]:
    bodies = _bodies(SIZES[size_name])
    raw = [
        load.request_bytes("127.0.0.1", running.port, running.path, b, "application/json")
        for b in bodies
    ]
    phases = []

    def run(name: str, coro: Any) -> Phase:
        cpu0, client0 = running.cpu(), _client_cpu()
        result = asyncio.run(coro)
        phase = Phase(name, result, running.cpu() - cpu0, _client_cpu() - client0)
        try:
            phase.boundaries = running.boundaries()
        except OSError as exc:  # stats of an overloaded target: the phase still counts
            print(f"  (no boundary stats: {exc})", flush=True)
        # Requests the client gave up on may still be queued in the target: the next phase
        # starts once it is idle again, so that it does not pay for this one.
        settle(running)
        print(
            f"  {size_name} {name:>11}: {result.throughput:7.1f} req/s ok={result.ok} "
            f"errors={result.errors} p50={1000 * result.percentile(0.5):.1f} ms "
            f"p99={1000 * result.percentile(0.99):.1f} ms cpu/req={phase.cpu_ms:.2f} ms "
            f"client cpu={phase.client_cpu:.1f}s",
            flush=True,
        )
        return phase

    # Warm-up: first requests import lazily, fill pools, JIT nothing: not counted.
    asyncio.run(load.closed_loop("127.0.0.1", running.port, raw, 4, args.warmup))
    running.boundaries()
    phases.append(
        run(
            "closed",
            load.closed_loop("127.0.0.1", running.port, raw, args.connections, args.duration),
        )
    )
    for rate in RATES[size_name]:
        phases.append(
            run(
                f"open {rate:g}/s",
                load.open_loop("127.0.0.1", running.port, raw, rate, args.duration),
            )
        )
    return phases, bodies


def idle_cores(running: Running, seconds: float = 2.0) -> float:
    """The target's CPU with no load (timers, health checks, Ray's daemons), in cores."""
    cpu0 = running.cpu()
    time.sleep(seconds)
    return (running.cpu() - cpu0) / seconds


def settle(running: Running) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        if idle_cores(running, 1.0) < max(IDLE, running.idle * 1.5 + 0.02):
            return
    print("  (still busy after the settle timeout)", flush=True)


def ray_wire_costs(bodies: list[bytes]) -> dict[str, dict[str, float]]:
    """What Ray's serialization does to each hop's payload (pickle protocol 5, as Ray's), timed
    here on the same payloads: Ray does not report it per call."""
    records = [json.loads(b)["records"] for b in bodies]
    payloads: dict[str, list[Any]] = {"clean": records}
    payloads["featurize"] = [stages.clean(r) for r in records]
    payloads["model"] = [stages.featurize(t)["ids"] for t in payloads["featurize"]]
    import torch

    torch.manual_seed(0)
    net = stages.TextNet().eval()
    with torch.inference_mode():
        payloads["label"] = [net(torch.from_numpy(i)).numpy() for i in payloads["model"]]
    out = {}
    for stage, items in payloads.items():
        t0 = time.perf_counter()
        dumped = [pickle.dumps(x, protocol=5) for x in items]
        t1 = time.perf_counter()
        for d in dumped:
            pickle.loads(d)
        t2 = time.perf_counter()
        out[stage] = {
            "serialize_ms": 1000 * (t1 - t0) / len(items),
            "deserialize_ms": 1000 * (t2 - t1) / len(items),
            "bytes": sum(map(len, dumped)) / len(items),
        }
    return out


# -- the report -------------------------------------------------------------------------------


def _boundary_rows(key: str, phase: Phase, extra: dict[str, Any]) -> list[str]:
    """Per stage hop: serialize, transfer, deserialize (ms per call) and bytes out/in."""
    b = phase.boundaries
    rows = []
    if key == "c":
        for stage, s in b.items():
            n = s["calls"] or 1
            rows.append(
                f"| {stage} | {1000 * (s['client_serialize'] + s['server_serialize']) / n:.3f} | "
                f"{1000 * s['transfer'] / n:.3f} | "
                f"{1000 * (s['server_deserialize'] + s['client_deserialize']) / n:.3f} | "
                f"{1000 * s['work'] / n:.3f} | "
                f"{s['bytes_out'] / n:,.0f} / {s['bytes_in'] / n:,.0f} |"
            )
    elif key == "d":
        wire = extra.get("ray_wire", {})
        for stage, s in b.items():
            n = s["calls"] or 1
            w = wire.get(stage, {})
            rows.append(
                f"| {stage} | ({w.get('serialize_ms', 0):.3f}) | "
                f"{1000 * s['boundary'] / n:.3f} (all of it) | "
                f"({w.get('deserialize_ms', 0):.3f}) | {1000 * s['work'] / n:.3f} | "
                f"{w.get('bytes', 0):,.0f} / - |"
            )
    else:
        order = ("clean", "featurize", "textcls", "label")
        for stage in sorted(b, key=lambda x: order.index(x) if x in order else len(order)):
            s = b[stage]
            n = s.get("webtorch_pipeline_stage_rows_total", 0) or 1
            moved_in = s.get("webtorch_pipeline_stage_bytes_total:in", 0.0)
            moved_out = s.get("webtorch_pipeline_stage_bytes_total:out", 0.0)
            in_stage = 1000 * s.get("webtorch_pipeline_stage_seconds_sum", 0.0) / n
            if "webtorch_pipeline_remote_seconds_sum:serialize" not in s:
                # In this process: no wire. A process placement pickles (bytes shown; its cost
                # is inside the stage's time).
                moved = f"{moved_in / n:,.0f} / {moved_out / n:,.0f} (pickled)" if moved_in else "-"
                rows.append(f"| {stage} | - | - | - | {in_stage:.3f} | {moved} |")
                continue
            part = {
                p: 1000 * s.get(f"webtorch_pipeline_remote_seconds_sum:{p}", 0.0) / n
                for p in ("serialize", "transfer", "deserialize")
            }
            rows.append(
                f"| {stage} | {part['serialize']:.3f} | {part['transfer']:.3f} | "
                f"{part['deserialize']:.3f} | {in_stage:.3f} | "
                f"{moved_in / n:,.0f} / {moved_out / n:,.0f} |"
            )
    return rows


def report(
    results: dict[str, dict[str, list[Phase]]], extra: dict[str, Any], args: argparse.Namespace
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        MARK_START,
        "## Pipelines: one process, split, FastAPI microservices, Ray Serve (issue 21)",
        "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/pipeline.py', *sys.argv[1:]])}`, {now}, "
        f"{os.cpu_count()} shared cores ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, nothing pinned, OMP_NUM_THREADS=1 everywhere. "
        f"{args.duration:g} s per phase, closed loop with {args.connections} connections. "
        "One document per request; latencies in ms; CPU per request = CPU of every process of "
        "the target over the phase / requests answered; client CPU = the load generator's "
        "share of the phase (seconds of CPU per second). Processes: (a) the server and 2 "
        "process workers (clean); (b) 3 stage servers and the front (the model stays there, "
        "with its training); (c) a gateway and 4 uvicorn services; (d) Ray's GCS, raylet, "
        "Serve controller, HTTP proxy and 5 replicas (`num_cpus=2`, replicas ask for none). "
        "The model is untrained in every target (the work per document does not depend on "
        "its weights).",
        "",
    ]
    idle = extra.get("idle", {})
    if idle:
        lines += [
            "Idle CPU of each target (no load, cores): "
            + ", ".join(f"({k}) {v:.3f}" for k, v in idle.items())
            + ". It is in every phase's CPU per request: at 20 requests/s, 0.02 cores is 1 ms "
            "per request.",
            "",
        ]
    for size in results.get(next(iter(results), ""), {}):
        lines += [
            f"### {size} documents",
            "",
            "| target | phase | req/s | p50 | p99 | errors | CPU/req (ms) | client CPU |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, per_size in results.items():
            for phase in per_size.get(size, []):
                r = phase.result
                errors = sum(r.errors.values())
                lines.append(
                    f"| ({key}) {TARGETS[key][0]} | {phase.name} | {r.throughput:.1f} | "
                    f"{1000 * r.percentile(0.5):.1f} | {1000 * r.percentile(0.99):.1f} | "
                    f"{errors} | {phase.cpu_ms:.2f} | "
                    f"{phase.client_cpu / r.seconds if r.seconds else 0:.2f} |"
                )
        lines.append("")
        lines += [
            f"Boundaries at the lowest open-loop rate ({size}), ms per document. serialize and "
            "deserialize count both ends of a hop (the caller encodes the batch and decodes the "
            "answer, the stage decodes the batch and encodes the answer); transfer is the rest "
            "of the round trip: sockets, HTTP parsing on both sides, event loops (for Ray: all "
            "between the handle call and the stage's work, its pickling, object transfer, "
            "replica queue and scheduling, which Ray does not report apart; in parentheses, "
            "pickle 5 of the same payloads timed in the benchmark process). in stage: for (c) "
            "and (d) the stage function's own time; for (a) and (b) the time the document spent "
            "in the stage as the (front) server sees it, queue wait included, and for a remote "
            "stage the whole round trip. bytes to / from the stage per document.",
            "",
        ]
        for key, per_size in results.items():
            phases = per_size.get(size, [])
            if len(phases) < 2:
                continue
            lines += [
                f"({key}) {TARGETS[key][0]}:",
                "",
                "| stage | serialize | transfer | deserialize | in stage | bytes to / from |",
                "|---|---:|---:|---:|---:|---:|",
                *_boundary_rows(key, phases[1], extra.get(size, {})),
                "",
            ]
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        tail = rest.split(MARK_END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


@contextmanager
def _target(key: str) -> Iterator[Running]:
    with tempfile.TemporaryDirectory(prefix=f"pipe-{key}-") as tmp, ExitStack() as stack:
        yield TARGETS[key][1](Path(tmp), stack)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--targets", default="a,b,c,d")
    parser.add_argument("--sizes", default="2KB,50KB")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="2 s phases, no file written")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = 2.0, 1.0
    results: dict[str, dict[str, list[Phase]]] = {}
    extra: dict[str, Any] = {}
    sizes = args.sizes.split(",")
    for key in args.targets.split(","):
        print(f"({key}) {TARGETS[key][0]}", flush=True)
        try:
            with _target(key) as running:
                results[key] = {}
                time.sleep(3.0)  # started: let its own warm-up end
                running.idle = idle_cores(running, 5.0)
                extra.setdefault("idle", {})[key] = running.idle
                print(f"  idle: {running.idle:.3f} cores", flush=True)
                for size in sizes:
                    phases, bodies = measure(running, size, args)
                    results[key][size] = phases
                    if key == "d":
                        extra.setdefault(size, {})["ray_wire"] = ray_wire_costs(bodies)
        except (harness.HarnessError, BenchError, OSError) as exc:
            print(f"  ({key}) not measured: {exc}", flush=True)
    section = report(results, extra, args)
    print(section)
    if not args.quick:
        write_section(args.output, section)


if __name__ == "__main__":
    main()
