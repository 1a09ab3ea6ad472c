"""Loop or thread: where WebTorch runs a model's compute, measured for a costly and a trivial model.

    .venv/bin/python benchmarks/compute_mode.py [--duration S] [--warmup S] [--output FILE]

For ``compute = "loop"`` and ``compute = "thread"`` this serves the MLP of
``benchmarks/models/mlp.py`` (64 -> 1024 -> 1024 -> 1024 -> 8, about 2.1 M multiply-adds per row)
at 1 and 64 connections, and the XOR example at 64 connections for reference. Each server runs
alone, pinned to CPU 0, with wrk pinned to CPU 1, through the helpers of ``benchmarks/run.py``.
Besides wrk's throughput and latency it reads the mean batch size, rows per forward pass over the
measured window, from ``/metrics``. The results replace the section between the compute markers in
BENCHMARKS.md (created after the ``run.py`` section when missing); the rest of the file is left
alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# benchmarks/ is sys.path[0] when this file runs as a script, so run.py imports as `run`.
from run import (
    BENCH_DIR,
    CLIENT_CPU,
    ROOT,
    SERVER_CPU,
    SHORT_BODY,
    XOR_FILE,
    BenchError,
    Target,
    WrkResult,
    check_answer,
    command_line,
    cpu_model,
    find_tool,
    free_port,
    log_tail,
    numbers,
    package_versions,
    replace_section,
    run_wrk,
    running,
    terminate_on_sigterm,
    tool_version,
    venv_bin,
    wait_until_answering,
    write_lua,
)
from run import MARK_END as BENCH_END

MLP_FILE = BENCH_DIR / "models" / "mlp.py"
MLP_BODY = json.dumps({"inputs": [[round(i / 64, 4) for i in range(64)]]}, separators=(",", ":"))
MODES = ("loop", "thread")
MAX_BATCH = 256
TIE = 0.05  # thread/loop req/s within 1 +- TIE is called a tie on this noisy machine
MARK_START = "<!-- compute:start -->"
MARK_END = "<!-- compute:end -->"


@dataclass(frozen=True)
class Case:
    model: str  # the config's model name, so the path is /models/{model}/predict
    file: Path
    body: str
    check: Callable[[bytes], None]
    connections: tuple[int, ...]
    label: str


@dataclass
class Point:
    case: Case
    mode: str
    connections: int
    load: WrkResult | None = None
    batch_rows: float | None = None  # mean rows per forward pass over the measured window
    error: str | None = None


@dataclass(frozen=True)
class Settings:
    duration: int
    warmup: int
    output: Path
    workdir: Path = Path()  # scratch directory of this run, set in main


def check_mlp_answer(answer: bytes) -> None:
    """One row in, one row of 8 outputs back."""
    try:
        data = json.loads(answer)
    except ValueError:
        raise BenchError(f"answer is not JSON: {answer[:200]!r}") from None
    if len(list(numbers(data))) != 8:
        raise BenchError(f"answer does not hold 8 numbers: {answer[:200]!r}")


CASES = [
    Case("mlp", MLP_FILE, MLP_BODY, check_mlp_answer, (1, 64), "MLP 64-1024-1024-1024-8"),
    Case("xor", XOR_FILE, SHORT_BODY, check_answer, (64,), "XOR (reference)"),
]


# --- servers and metrics ---------------------------------------------------------------------


def serve_command(case: Case, mode: str) -> Callable[[int, Path], list[str]]:
    def command(port: int, workdir: Path) -> list[str]:
        config = workdir / f"{case.model}-{mode}.toml"
        config.write_text(
            f"[models.{case.model}]\n"
            f"path = {json.dumps(str(case.file))}\n"
            f"max_batch = {MAX_BATCH}\n"
            f'compute = "{mode}"\n'
        )
        return [venv_bin("webtorch"), "serve", str(config), "--listen", f"127.0.0.1:{port}"]

    return command


def batch_totals(base: str, model: str) -> tuple[float, float]:
    """``webtorch_model_batch_rows`` (sum, count) of ``model`` from the server's /metrics."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=5.0) as response:
        text = response.read().decode()
    totals = []
    for field in ("sum", "count"):
        pattern = rf'^webtorch_model_batch_rows_{field}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$'
        match = re.search(pattern, text, re.MULTILINE)
        if match is None:
            raise BenchError(f"/metrics has no webtorch_model_batch_rows_{field} for {model!r}")
        totals.append(float(match.group(1)))
    return totals[0], totals[1]


def measure(case: Case, mode: str, settings: Settings) -> list[Point]:
    """One server for ``case`` in ``mode``; one warm-up, then one wrk run per connection count."""
    points = [Point(case, mode, c) for c in case.connections]
    target = Target(
        f"{case.model}-{mode}",
        case.label,
        f"/models/{case.model}/predict",
        case.body,
        serve_command(case, mode),
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = base + target.path
    log = settings.workdir / f"{target.key}.log"
    lua = write_lua(settings.workdir, target)
    try:
        with running(target.command(port, settings.workdir), log) as proc:
            case.check(wait_until_answering(proc, url, case.body, log))
            run_wrk(url, lua, max(case.connections), settings.warmup)
            for point in points:
                rows_before, batches_before = batch_totals(base, case.model)
                point.load = run_wrk(url, lua, point.connections, settings.duration)
                rows_after, batches_after = batch_totals(base, case.model)
                if batches_after > batches_before:
                    point.batch_rows = (rows_after - rows_before) / (batches_after - batches_before)
            if proc.poll() is not None:
                raise BenchError(f"server exited during the run:\n{log_tail(log)}")
    except (BenchError, OSError) as exc:
        for point in points:
            if point.load is None or point.batch_rows is None:
                point.error = str(exc)
    return points


def describe(point: Point) -> str:
    if point.error is not None:
        return f"FAILED: {point.error}"
    assert point.load is not None
    load = point.load
    text = f"{load.rps:,.0f} req/s, p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms"
    if point.batch_rows is not None:
        text += f", mean batch {point.batch_rows:.1f} rows"
    if load.errors:
        text += f", {load.errors} errors"
    return text


# --- report ----------------------------------------------------------------------------------


def rps(points: list[Point], model: str, mode: str, connections: int) -> float | None:
    for p in points:
        same = (p.case.model, p.mode, p.connections) == (model, mode, connections)
        if same and p.load is not None:
            return p.load.rps
    return None


def thread_ratio(points: list[Point], model: str, connections: int) -> float | None:
    loop = rps(points, model, "loop", connections)
    thread = rps(points, model, "thread", connections)
    return thread / loop if loop and thread is not None else None


def table(points: list[Point]) -> list[str]:
    rows = [
        "| Model | `compute` | connections | req/s | p50 | p99 | mean batch (rows) "
        "| thread ÷ loop req/s | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        head = f"| {p.case.label} | `{p.mode}` | {p.connections} "
        if p.load is None:
            rows.append(head + "| failed (see below) | | | | | |")
            continue
        batch = f"{p.batch_rows:.1f}" if p.batch_rows is not None else "n/a"
        ratio = thread_ratio(points, p.case.model, p.connections)
        shown = f"{ratio:.2f}x" if p.mode == "thread" and ratio is not None else ""
        rows.append(
            head + f"| {p.load.rps:,.0f} | {p.load.p50_ms:.2f} ms | {p.load.p99_ms:.2f} ms "
            f"| {batch} | {shown} | {p.load.errors} |"
        )
    return rows


def winner(ratio: float | None) -> str:
    if ratio is None:
        return "nothing could be decided (a measurement failed)"
    if ratio > 1 + TIE:
        return '`compute = "thread"` wins'
    if ratio < 1 - TIE:
        return '`compute = "loop"` wins'
    return "neither mode wins"


def reading(points: list[Point]) -> str:
    def shown(ratio: float | None) -> str:
        return f"{ratio:.2f}x" if ratio is not None else "n/a"

    mlp64, mlp1 = thread_ratio(points, "mlp", 64), thread_ratio(points, "mlp", 1)
    xor64 = thread_ratio(points, "xor", 64)
    return (
        f"For a model with a costly forward pass (the MLP) {winner(mlp64)} at 64 connections "
        f"(thread ÷ loop req/s {shown(mlp64)}; {shown(mlp1)} at 1 connection), and for a "
        f"trivial one (XOR) {winner(xor64)} (thread ÷ loop {shown(xor64)}), counting "
        f"differences within ±{TIE:.0%} as a tie on this shared, noisy machine."
    )


def failure_lines(points: list[Point]) -> list[str]:
    lines = []
    for p in points:
        if p.error is not None:
            name = f"{p.case.label}, `{p.mode}`, {p.connections} connections"
            lines += [f"**{name}** failed:", "", "```", p.error, "```", ""]
    return lines


def render(points: list[Point], settings: Settings, load_before: str) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mlp = MLP_FILE.relative_to(ROOT)
    lines = [
        MARK_START,
        f"## Compute on the loop thread or a worker thread: {now}",
        "",
        f"- Command: `{command_line()}`",
        f"- Machine: {os.cpu_count()} CPUs (`nproc`: {len(os.sched_getaffinity(0))}), "
        f"{cpu_model()}, Linux {platform.release()}; load average before the run: {load_before}",
        f"- Software: Python {platform.python_version()}, {package_versions()}; "
        f"{tool_version([find_tool('wrk'), '-v'])}",
        f"- Method: for each model and `compute` mode one `webtorch serve` with a temporary "
        f"config (`max_batch = {MAX_BATCH}`, `max_delay` left at 0) pinned with "
        f"`taskset -c {SERVER_CPU}`, a {settings.warmup}s warm-up at the highest connection "
        f"count, then `taskset -c {CLIENT_CPU} wrk -t1 -cN -d{settings.duration}s --latency` "
        "POSTing one row to `/models/{model}/predict`. MLP: "
        f"`{mlp}`, 64 -> 1024 -> 1024 -> 1024 -> 8 with ReLU (about 2.1 M multiply-adds per "
        "row), a row of 64 floats; XOR: the embedded example, `[0, 1]`. Mean batch is rows per "
        "forward pass over the measured window: the change in `webtorch_model_batch_rows_sum` "
        "over the change in `_count` from `/metrics`, read before and after the load. Errors are "
        "wrk's non-2xx responses and socket errors.",
        "",
        *table(points),
        "",
        f"- Reading: {reading(points)}",
        "",
        *failure_lines(points),
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


def update_results_file(path: Path, section: str) -> None:
    replace_section(path, section, MARK_START, MARK_END, after=BENCH_END)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement (5)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per server (2)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.warmup < 1:
        parser.error("--duration and --warmup must be at least 1")
    return Settings(args.duration, args.warmup, args.output)


def check_environment() -> None:
    for tool in ("wrk", "taskset"):
        find_tool(tool)
    venv_bin("webtorch")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("error: needs two CPUs (server on CPU 0, wrk on CPU 1)")


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    check_environment()
    terminate_on_sigterm()
    load_before = Path("/proc/loadavg").read_text().split(" ")[0]
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="webtorch-compute-") as tmp:
        settings = dataclasses.replace(settings, workdir=Path(tmp))
        for case in CASES:
            for mode in MODES:
                print(f"{case.label}, compute = {mode} ...", flush=True)
                for point in measure(case, mode, settings):
                    points.append(point)
                    print(f"  {point.connections} connections: {describe(point)}", flush=True)
    update_results_file(settings.output, render(points, settings, load_before))
    print(f"wrote {settings.output}")
    print(reading(points))
    return 1 if any(p.error is not None for p in points) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
