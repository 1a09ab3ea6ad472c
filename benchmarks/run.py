"""Side-by-side throughput and latency: nginx, WebTorch, FastAPI and LitServe serving XOR.

    .venv/bin/python benchmarks/run.py [--duration S] [--quick] [--repeat N]
        [--targets nginx,webtorch,...] [--output FILE]

Every server runs pinned to CPU 0 and wrk to CPU 1, one after the other in this one run, so the
ratios between them mean something on a shared, noisy machine even when the absolute numbers do
not. The whole list of targets runs ``--repeat`` times in rounds (every target once, then again),
so a slow drift of the machine hits all targets alike, and the report shows each target's median
over the rounds next to every round's req/s. The results replace the section between the markers
in BENCHMARKS.md at the repository root. Install what this needs with ``benchmarks/setup``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import webtorch_harness as harness

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
XOR_FILE = ROOT / "src" / "webtorch" / "examples" / "xor.py"
SERVER_CPU = "0"
CLIENT_CPU = "1"
CONNECTIONS = 64
START_TIMEOUT = 90.0  # seconds a server gets to answer its first request
STOP_TIMEOUT = 10.0  # seconds a server and its workers get to exit on SIGTERM before SIGKILL
MARK_START = "<!-- bench:start -->"
MARK_END = "<!-- bench:end -->"

SHORT_PATH = "/models/xor/predict"
SHORT_BODY = '{"inputs": [[0, 1]]}'
OIP_PATH = "/v2/models/xor/infer"
OIP_BODY = '{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0, 1]}]}'
# What nginx returns: the size and shape of a short-form answer, so it is the same work for wrk.
NGINX_BODY = '{"outputs":[[0.9991369843482971]]}'

INTRO = """\
# Benchmarks

Side-by-side measurements made by `benchmarks/run.py` (install its tools with `benchmarks/setup`).
The machine is shared and noisy, so compare the ratios within one run, not absolute numbers
across runs. The section below is rewritten by every run; the rest of this file is left alone.
"""


class BenchError(Exception):
    """A target could not be measured; the message says why."""


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    path: str
    body: str
    # (port, scratch directory) -> the server's argv, before taskset
    command: Callable[[int, Path], list[str]]
    lone: bool = False  # also measure the latency of one connection's lone requests


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


@dataclass
class Result:
    target: Target
    load: WrkResult | None = None
    lone: WrkResult | None = None
    rss_mib: float | None = None
    pss_mib: float | None = None
    processes: int = 0
    error: str | None = None


def median_wrk(results: list[WrkResult]) -> WrkResult:
    """Each figure's median over ``results``; the counts are summed."""
    return WrkResult(
        rps=statistics.median(r.rps for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        requests=sum(r.requests for r in results),
        non_2xx=sum(r.non_2xx for r in results),
        socket_errors=sum(r.socket_errors for r in results),
    )


@dataclass
class Rounds:
    """One target's results, one per round, in the order of the rounds."""

    target: Target
    results: list[Result] = dataclasses.field(default_factory=list)

    @property
    def rps(self) -> list[float | None]:
        """Each round's req/s at 64 connections; None for a round that failed."""
        return [r.load.rps if r.load is not None else None for r in self.results]

    @property
    def median_rps(self) -> float | None:
        done = [rps for rps in self.rps if rps is not None]
        return statistics.median(done) if done else None

    @property
    def median_round(self) -> Result | None:
        """The round whose req/s is the median; the lower middle one for an even count."""
        done = [(r.load.rps, r) for r in self.results if r.load is not None]
        if not done:
            return None
        done.sort(key=lambda pair: pair[0])
        return done[(len(done) - 1) // 2][1]

    @property
    def lone(self) -> WrkResult | None:
        """The lone-request figures, each the median over the rounds that measured it."""
        lones = [r.lone for r in self.results if r.lone is not None]
        return median_wrk(lones) if lones else None

    @property
    def errors(self) -> int:
        """wrk's errors at 64 connections, summed over the rounds."""
        return sum(r.load.errors for r in self.results if r.load is not None)


@dataclass(frozen=True)
class Settings:
    duration: int
    warmup: int
    targets: list[str]
    output: Path
    repeat: int = 3  # rounds over the whole list of targets
    workdir: Path = Path()  # scratch directory of this run, set in main


# --- targets ---------------------------------------------------------------------------------


def nginx_command(port: int, workdir: Path) -> list[str]:
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(port, workdir))
    return [
        find_tool("nginx"),
        "-e",
        str(workdir / "nginx-error.log"),
        "-p",
        str(workdir),
        "-c",
        str(conf),
    ]


def nginx_conf(port: int, workdir: Path) -> str:
    body = NGINX_BODY.replace("'", "\\'")
    return textwrap.dedent(f"""\
        daemon off;
        worker_processes 1;
        pid {workdir}/nginx.pid;
        error_log {workdir}/nginx-error.log warn;
        events {{ worker_connections 1024; }}
        http {{
            access_log off;
            client_body_temp_path {workdir}/client_body;
            keepalive_requests 1000000;
            server {{
                listen 127.0.0.1:{port};
                location / {{
                    default_type application/json;
                    return 200 '{body}';
                }}
            }}
        }}
        """)


def webtorch_command(port: int, workdir: Path) -> list[str]:
    return [venv_bin("webtorch"), "serve", "--listen", f"127.0.0.1:{port}"]


def webtorch_thread_command(port: int, workdir: Path) -> list[str]:
    config = workdir / "xor-thread.toml"
    config.write_text(f'[models.xor]\npath = "{XOR_FILE}"\ncompute = "thread"\n')
    return [venv_bin("webtorch"), "serve", str(config), "--listen", f"127.0.0.1:{port}"]


def script_command(script: str) -> Callable[[int, Path], list[str]]:
    def command(port: int, workdir: Path) -> list[str]:
        return [sys.executable, str(BENCH_DIR / script), "--port", str(port)]

    return command


TARGETS = [
    Target("nginx", "nginx `return 200`", SHORT_PATH, SHORT_BODY, nginx_command),
    Target("webtorch", "WebTorch short form", SHORT_PATH, SHORT_BODY, webtorch_command, lone=True),
    Target("oip", "WebTorch OIP JSON", OIP_PATH, OIP_BODY, webtorch_command),
    Target(
        "thread",
        "WebTorch short form, `compute = thread`",
        SHORT_PATH,
        SHORT_BODY,
        webtorch_thread_command,
    ),
    Target(
        "fastapi",
        "FastAPI + uvicorn",
        SHORT_PATH,
        SHORT_BODY,
        script_command("fastapi_xor.py"),
        lone=True,
    ),
    Target("litserve", "LitServe", SHORT_PATH, SHORT_BODY, script_command("litserve_xor.py")),
    Target(
        "prototype",
        "40-line uvloop+httptools prototype (no validation, limits, metrics)",
        SHORT_PATH,
        SHORT_BODY,
        script_command("prototype_xor.py"),
    ),
]
TARGET_KEYS = [t.key for t in TARGETS]


# --- tools and processes ---------------------------------------------------------------------


def find_tool(name: str) -> str:
    """``name`` on PATH or in /usr/sbin (where Debian puts nginx, often off a user's PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise SystemExit(f"error: `{name}` is not installed; run benchmarks/setup")
    return found


def venv_bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"error: {path} is missing; run benchmarks/setup")
    return str(path)


def check_proxy_environment(tools: Sequence[str], targets: Sequence[str]) -> None:
    """What the proxy benchmarks (proxy.py, failover.py) need before they start anything."""
    for tool in tools:
        find_tool(tool)
    if "webtorch" in targets:
        venv_bin("webtorch")
    if not {int(SERVER_CPU), int(CLIENT_CPU)} <= os.sched_getaffinity(0):
        raise SystemExit(f"error: needs CPUs {SERVER_CPU} (proxy) and {CLIENT_CPU} (the rest)")


def run_main(main: Callable[[], int]) -> None:
    """Exit with ``main()``'s status; Ctrl-C stops the servers (each runs in a ``with``)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)


def check_environment() -> None:
    for tool in ("wrk", "nginx", "taskset"):
        find_tool(tool)
    venv_bin("webtorch")
    for module in ("fastapi", "uvicorn", "litserve"):
        try:
            metadata.version(module)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"error: {module} is not installed; run benchmarks/setup") from None
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("error: needs two CPUs (server on CPU 0, wrk on CPU 1)")


free_port = harness.free_port
session_pids = harness.session_pids


@contextmanager
def running(argv: list[str], log: Path) -> Iterator[harness.Process]:
    """Run ``argv`` pinned to the server CPU in its own session (webtorch_harness); stop the
    whole session after: SIGTERM, then SIGKILL for what is left after ``STOP_TIMEOUT``."""
    try:
        proc = harness.start(argv, log=log, cpus=SERVER_CPU)
    except harness.HarnessError as exc:
        raise BenchError(str(exc)) from None
    try:
        yield proc
    finally:
        proc.stop(timeout=STOP_TIMEOUT)


def memory_kib(pid: int, file: str, key: str) -> int:
    """``key`` (in kB) from /proc/PID/``file``; 0 if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/{file}").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def rss_kib(pid: int) -> int:
    return memory_kib(pid, "status", "VmRSS")


def pss_kib(pid: int) -> int:
    """Proportional set size: pages shared between a server's processes counted once overall."""
    return memory_kib(pid, "smaps_rollup", "Pss")


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- requests and wrk ------------------------------------------------------------------------


def post(url: str, body: str, timeout: float = 5.0) -> bytes:
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return bytes(response.read())


def wait_until_answering(proc: harness.Process, url: str, body: str, log: Path) -> bytes:
    """Poll ``url`` until it answers 200 or ``START_TIMEOUT`` passes; return the first answer."""

    def ready(status: int, answer: bytes) -> bool:
        if status not in (200, 503):  # up but answering wrong: waiting will not help
            raise BenchError(f"{url} answered {status}: {answer[:300]!r}")
        return status == 200

    try:
        _, answer = proc.wait_http(
            url,
            method="POST",
            body=body.encode(),
            headers={"Content-Type": "application/json"},
            timeout=START_TIMEOUT,
            ready=ready,
        )
    except harness.HarnessError as exc:
        raise BenchError(str(exc)) from None
    return answer


def numbers(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)


def check_answer(answer: bytes) -> None:
    """XOR(0, 1) is 1: the answer must hold a number close to it."""
    try:
        data = json.loads(answer)
    except ValueError:
        raise BenchError(f"answer is not JSON: {answer[:200]!r}") from None
    if not any(0.9 <= n <= 1.0 for n in numbers(data)):
        raise BenchError(f"answer holds no number close to 1 for [0, 1]: {answer[:200]!r}")


def write_lua(workdir: Path, target: Target) -> Path:
    script = workdir / f"post-{target.key}.lua"
    # A JSON string literal is also a valid Lua string literal for this ASCII body.
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(target.body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


def run_wrk(url: str, lua: Path, connections: int, duration: int) -> WrkResult:
    argv = [
        "taskset", "-c", CLIENT_CPU, find_tool("wrk"), "-t1", f"-c{connections}",
        f"-d{duration}s", "--latency", "-s", str(lua), url,
    ]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {duration + 30}s") from None
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    return parse_wrk(done.stdout)


UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(text: str) -> WrkResult:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, text, re.MULTILINE)
        if match is None:
            raise BenchError(f"cannot find {pattern!r} in wrk's output:\n{text}")
        return match

    def percentile(p: str) -> float:
        match = find(rf"^\s*{p}%\s+([\d.]+)(us|ms|s|m|h)\s*$")
        return float(match.group(1)) * UNITS_MS[match.group(2)]

    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return WrkResult(
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=percentile("50"),
        p99_ms=percentile("99"),
        requests=int(find(r"^\s*(\d+) requests in").group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sock.groups()) if sock else 0,
    )


# --- one target ------------------------------------------------------------------------------


def measure(target: Target, settings: Settings) -> Result:
    result = Result(target)
    port = free_port()
    url = f"http://127.0.0.1:{port}{target.path}"
    log = settings.workdir / f"{target.key}.log"
    lua = write_lua(settings.workdir, target)
    try:
        with running(target.command(port, settings.workdir), log) as proc:
            check_answer(wait_until_answering(proc, url, target.body, log))
            run_wrk(url, lua, CONNECTIONS, settings.warmup)
            result.load = run_wrk(url, lua, CONNECTIONS, settings.duration)
            pids = session_pids(proc.pid)
            result.processes = len(pids)
            result.rss_mib = sum(rss_kib(pid) for pid in pids) / 1024
            result.pss_mib = sum(pss_kib(pid) for pid in pids) / 1024
            if target.lone:
                result.lone = run_wrk(url, lua, 1, settings.duration)
            if proc.poll() is not None:
                raise BenchError(f"server exited during the run:\n{log_tail(log)}")
    except BenchError as exc:
        result.error = str(exc)
    return result


def describe(result: Result) -> str:
    if result.error is not None:
        return f"FAILED: {result.error}"
    assert result.load is not None
    load = result.load
    text = (
        f"{load.rps:,.0f} req/s, p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms, "
        f"RSS {result.rss_mib:.0f} MiB in {result.processes} process(es)"
    )
    if load.errors:
        text += f", {load.errors} errors"
    if result.lone is not None:
        text += f"; lone request p50 {result.lone.p50_ms:.3f} ms, p99 {result.lone.p99_ms:.3f} ms"
    return text


# --- report ----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tool_version(argv: list[str]) -> str:
    """``nginx/1.22.1`` or ``wrk debian/4.1.0-3+b2`` from the tool's version banner."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return f"{Path(argv[0]).name} (unknown version)"
    match = re.search(r"nginx/\S+|wrk \S+", done.stdout + done.stderr)
    return match.group(0) if match else f"{Path(argv[0]).name} (unknown version)"


def package_versions() -> str:
    names = ("webtorch", "torch", "fastapi", "uvicorn", "litserve")
    versions = []
    for name in names:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return ", ".join(versions)


def command_line() -> str:
    def rel(path: str) -> str:
        p = Path(path).absolute()
        return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path

    return shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "n/a"
    return f"{value / reference:.2f}x"


def rps_of(results: dict[str, Rounds], key: str) -> float | None:
    """``key``'s median req/s over the rounds; None if it was not measured or always failed."""
    rounds = results.get(key)
    return rounds.median_rps if rounds is not None else None


def per_round(value: float | None) -> str:
    """``45.7k`` (or ``850``) for one round's req/s; ``failed`` for a round that failed."""
    if value is None:
        return "failed"
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def round_ratios(results: dict[str, Rounds], key: str, reference: str) -> str:
    """``0.38x / 0.43x / 0.41x``: ``key``'s req/s over ``reference``'s, round by round."""
    value, ref = results.get(key), results.get(reference)
    if value is None or ref is None:
        return "n/a"
    return " / ".join(ratio(v, r) for v, r in zip(value.rps, ref.rps, strict=True))


def ratio_detail(results: dict[str, Rounds], key: str, reference: str) -> str:
    """``0.41x median; rounds 0.38x / 0.43x / 0.41x``."""
    median = ratio(rps_of(results, key), rps_of(results, reference))
    return f"{median} median; rounds {round_ratios(results, key, reference)}"


def load_row(rounds: Rounds, nginx: float | None, fastapi: float | None) -> str:
    name, result, rps = rounds.target.label, rounds.median_round, rounds.median_rps
    if result is None or result.load is None or rps is None:
        return f"| {name} | failed (see below) | | | | | | | | |"
    load = result.load
    return (
        f"| {name} | {rps:,.0f} | {' / '.join(per_round(v) for v in rounds.rps)} "
        f"| {load.p50_ms:.2f} ms | {load.p99_ms:.2f} ms "
        f"| {result.rss_mib:.0f} MiB ({result.processes}) | {result.pss_mib:.0f} MiB "
        f"| {ratio(rps, nginx)} | {ratio(rps, fastapi)} | {rounds.errors} |"
    )


def load_table(results: dict[str, Rounds]) -> list[str]:
    nginx, fastapi = rps_of(results, "nginx"), rps_of(results, "fastapi")
    return [
        "| Target | req/s | req/s per round | p50 | p99 | RSS (processes) | PSS | x nginx "
        "| x FastAPI | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(load_row(rounds, nginx, fastapi) for rounds in results.values()),
    ]


def lone_table(results: dict[str, Rounds]) -> list[str]:
    rows = ["| Target | p50 | p99 | req/s |", "|---|---:|---:|---:|"]
    for rounds in results.values():
        lone = rounds.lone
        if lone is not None:
            rows.append(
                f"| {rounds.target.label} | {lone.p50_ms:.3f} ms | {lone.p99_ms:.3f} ms "
                f"| {lone.rps:,.0f} |"
            )
    if len(rows) == 2:
        rows.append("| not measured | | | |")
    return rows


def verdict(ok: bool | None) -> str:
    return {True: "**pass**", False: "**FAIL**", None: "not measured"}[ok]


def at_least(value: float | None, reference: float | None, factor: float) -> bool | None:
    if value is None or reference is None:
        return None
    return value >= factor * reference


def lone_verdict(results: dict[str, Rounds]) -> tuple[bool | None, str]:
    """Whether WebTorch's median lone-request p50 and p99 are no worse than FastAPI's, and why."""
    wt, fa = results.get("webtorch"), results.get("fastapi")
    wt_lone = wt.lone if wt is not None else None
    fa_lone = fa.lone if fa is not None else None
    if wt_lone is None or fa_lone is None:
        return None, "n/a"
    ok = wt_lone.p50_ms <= fa_lone.p50_ms and wt_lone.p99_ms <= fa_lone.p99_ms
    detail = (
        f"medians: p50 {wt_lone.p50_ms:.3f} vs {fa_lone.p50_ms:.3f} ms, "
        f"p99 {wt_lone.p99_ms:.3f} vs {fa_lone.p99_ms:.3f} ms"
    )
    return ok, detail


def target_lines(results: dict[str, Rounds]) -> list[str]:
    nginx, fastapi = rps_of(results, "nginx"), rps_of(results, "fastapi")
    short, oip = rps_of(results, "webtorch"), rps_of(results, "oip")
    lone, lone_detail = lone_verdict(results)
    return [
        f"- WebTorch short form ≥ 0.5x nginx: {verdict(at_least(short, nginx, 0.5))} "
        f"({ratio_detail(results, 'webtorch', 'nginx')})",
        f"- WebTorch short form ≥ 10x FastAPI: {verdict(at_least(short, fastapi, 10))} "
        f"({ratio(short, fastapi)} median)",
        f"- WebTorch OIP JSON ≥ 0.35x nginx: {verdict(at_least(oip, nginx, 0.35))} "
        f"({ratio_detail(results, 'oip', 'nginx')})",
        f"- Lone-request latency (p50 and p99) no worse than FastAPI's: {verdict(lone)} "
        f"({lone_detail})",
        f'- For the loop-vs-thread decision (no target): `compute = "thread"` served '
        f'{ratio(rps_of(results, "thread"), short)} of `compute = "loop"` (medians)',
    ]


def failure_lines(results: Mapping[str, Any]) -> list[str]:
    """The error of every failed round, for the report; any benchmark's rounds (each with
    ``target.label`` and ``results`` whose items have ``error``)."""
    lines = []
    for rounds in results.values():
        for number, result in enumerate(rounds.results, 1):
            if result.error is not None:
                label = rounds.target.label
                lines += [f"**{label}** failed in round {number}:", "", "```", result.error, "```"]
                lines.append("")
    return lines


def rounds_text(repeat: int) -> str:
    return "1 round" if repeat == 1 else f"{repeat} rounds"


def method_line(settings: Settings) -> str:
    rounds = rounds_text(settings.repeat)
    even = (
        " (the lower of the middle two, as the count is even)" if settings.repeat % 2 == 0 else ""
    )
    return (
        f"- Method: each server alone, pinned with `taskset -c {SERVER_CPU}`; "
        f"`taskset -c {CLIENT_CPU} wrk -t1 -c{CONNECTIONS} -d{settings.duration}s --latency` "
        f"with a POST body after a {settings.warmup}s warm-up. The whole list of targets ran "
        f"{rounds} (every target once, in order, then again), so a slow drift of the machine hits "
        f"all targets alike; **the tables show medians over the {rounds}**: req/s and the ratios "
        "are the median req/s, and p50, p99, RSS and PSS come from the round whose req/s is the "
        f"median{even}; errors are summed over the rounds; each lone-request figure is its own "
        "median over the rounds. RSS is VmRSS summed over the server's processes (count in "
        "brackets) after the load, PSS the same with shared pages counted once; errors are wrk's "
        "non-2xx responses and socket errors. nginx answers a fixed JSON body of the same size "
        "(`keepalive_requests` raised so it never closes connections). Server logs are in a "
        "temporary directory removed after the run."
    )


def render(results: dict[str, Rounds], settings: Settings, load_before: str) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        MARK_START,
        f"## Latest run: {now}",
        "",
        f"- Command: `{command_line()}`",
        f"- Machine: {os.cpu_count()} CPUs (`nproc`: {len(os.sched_getaffinity(0))}), "
        f"{cpu_model()}, Linux {platform.release()}; load average before the run: {load_before}",
        f"- Software: Python {platform.python_version()}, {package_versions()}; "
        f"{tool_version([find_tool('nginx'), '-v'])}; {tool_version([find_tool('wrk'), '-v'])}",
        method_line(settings),
        "",
        f"### Throughput, 64 connections (median of {rounds_text(settings.repeat)})",
        "",
        *load_table(results),
        "",
        f"### Lone requests, 1 connection ({settings.duration}s, median of "
        f"{rounds_text(settings.repeat)})",
        "",
        *lone_table(results),
        "",
        "### Targets",
        "",
        *target_lines(results),
        "",
        *failure_lines(results),
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


def update_results_file(path: Path, section: str) -> None:
    replace_section(path, section, MARK_START, MARK_END)


def replace_section(
    path: Path, section: str, start_mark: str, end_mark: str, after: str | None = None
) -> None:
    """Replace the text from ``start_mark`` to ``end_mark`` with ``section`` (which holds both
    marks), or insert it after the line ``after`` (else at the end) when the marks are missing;
    create the file if it is missing. Every other byte of the file is kept: BENCHMARKS.md holds
    several scripts' sections and prose written by hand."""
    text = path.read_text() if path.exists() else INTRO
    section = section.rstrip("\n")
    start, end = text.find(start_mark), text.find(end_mark)
    if 0 <= start < end:
        text = text[:start] + section + text[end + len(end_mark) :]
    elif after is not None and (found := text.find(after)) >= 0:
        at = found + len(after)
        text = text[:at] + "\n\n" + section + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, help="seconds per measurement (10; --quick: 3)")
    parser.add_argument("--quick", action="store_true", help="short measurements and warm-ups")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds over the whole list of targets; the report shows medians (3)",
    )
    parser.add_argument(
        "--targets", default=",".join(TARGET_KEYS), help=f"comma-separated subset of {TARGET_KEYS}"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGET_KEYS))
    if unknown or not targets:
        parser.error(f"--targets: unknown {unknown}; choose from {TARGET_KEYS}")
    duration = args.duration if args.duration is not None else (3 if args.quick else 10)
    if duration < 1:
        parser.error("--duration must be at least 1")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    warmup = 1 if args.quick else 2
    return Settings(duration, warmup, targets, args.output, args.repeat)


def terminate_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C does, so every server is stopped by its ``finally``."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_rounds(settings: Settings) -> dict[str, Rounds]:
    results = {t.key: Rounds(t) for t in TARGETS if t.key in settings.targets}
    return in_rounds(results, settings.repeat, lambda t: measure(t, settings), describe)


def in_rounds(
    results: dict[str, Any],
    repeat: int,
    measure_one: Callable[[Any], Any],
    say: Callable[[Any], str],
) -> dict[str, Any]:
    """Measure every target of ``results`` (``.target``, ``.results``) once per round, in
    order, for ``repeat`` rounds: a slow drift of the machine then hits all targets alike."""
    for number in range(1, repeat + 1):
        for rounds in results.values():
            print(f"round {number}/{repeat}: {rounds.target.label} ...", flush=True)
            result = measure_one(rounds.target)
            rounds.results.append(result)
            print(f"  {say(result)}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    check_environment()
    terminate_on_sigterm()
    load_before = Path("/proc/loadavg").read_text().split(" ")[0]
    with tempfile.TemporaryDirectory(prefix="webtorch-bench-") as tmp:
        results = run_rounds(dataclasses.replace(settings, workdir=Path(tmp)))
    update_results_file(settings.output, render(results, settings, load_before))
    print(f"wrote {settings.output}")
    for line in target_lines(results):
        print(line)
    failed = any(r.error is not None for rounds in results.values() for r in rounds.results)
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
