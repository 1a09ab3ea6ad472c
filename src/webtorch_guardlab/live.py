"""``webtorch guard eval --live``: the guard against live attacks on loopback, beside baselines.

Every scenario starts a real ``webtorch serve`` (pinned to core 0 when the machine has two) with
one of three configs, and drives it from load generators in other processes (pinned to core 1):

- ``none``: no guard, the server's default limits (no defence);
- ``bucket``: nginx's limit_req + limit_conn + timeouts: ``[guard]`` enforcing with no detector
  (``model = "none"``), a per-address token bucket and connection cap, shorter header and body
  timeouts;
- ``guard``: the same plus the shipped detector (the full guard).

Scenarios, each bounded in time:

1. **flood**: benign clients with think time (each its own 127/8 address), a control run of
   them alone, then the same with an HTTP keep-alive flood from many other addresses starting
   ``flood_start`` seconds in (``live_load.py``); Debian's goldeneye as a second flood tool.
2. **slow**: Debian's slowhttptest, slowloris (-H) and slow POST (-B), while benign clients keep
   asking.
3. **cost**: an open-loop stream at a moderate fixed rate (latency, server CPU per request) and a
   closed-loop saturation run (throughput), with and without the guard.

:func:`run_live` runs them all; :func:`live_report` writes the ``## Live attacks`` section of
GUARD_RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import webtorch_harness as harness
from webtorch import examples
from webtorch.config import GuardConfig
from webtorch_guardlab import live_load

SERVER_CORE, LOAD_CORE = 0, 1
SCRAPER = "127.0.9.9"  # the harness's own address (metrics, health): allow-listed by the guard
CONFIGS = ("none", "bucket", "guard")
# The cost scenario adds the full guard in monitor mode: every decision made, none enforced, so
# the handler runs for every request as it does without the guard.
COST_CONFIGS = ("none", "bucket", "guard", "monitor")
CONFIG_NAMES = {
    "none": "no defence",
    "bucket": "token bucket",
    "guard": "full guard",
    "monitor": "full guard, monitor mode",
}
XOR = Path(examples.__file__).resolve().parent / "xor.py"
LIVE_HEADING = "## Live attacks"


@dataclass(frozen=True)
class LiveSettings:
    """The scale of every scenario, and the baselines' settings (an operator's choices)."""

    benign_clients: int = 50
    benign_rate: tuple[float, float] = (2.0, 5.0)  # requests/s of each benign client
    control: float = 4.0  # seconds of benign load alone
    flood_addresses: int = 200
    flood_per_address: int = 2  # keep-alive connections per flooding address
    flood_start: float = 5.0  # seconds into the run
    flood_duration: float = 10.0
    flood_after: float = 2.0  # benign load continues this long after the flood
    goldeneye: float = 6.0  # seconds of goldeneye (0: skip)
    goldeneye_workers: int = 4
    goldeneye_sockets: int = 30
    slow_connections: int = 1000
    slow_rate: int = 500  # new slow connections per second
    slow_interval: int = 3  # seconds between a slow connection's follow-up bytes
    slow_duration: float = 12.0  # 0: skip
    cost_rate: float = 2000.0  # requests/s of the open-loop latency run
    cost_addresses: int = 200
    cost_duration: float = 3.0
    saturation_addresses: int = 2000
    saturation_duration: float = 2.0
    cost_rounds: int = 2  # 0: skip
    timeout: float = 5.0  # a benign request unanswered this long is a failure
    # The baselines: nginx limit_req rate=20r/s burst=40 nodelay, limit_conn 10, and shorter
    # client_header_timeout / client_body_timeout than the server's defaults (10 s, 60 s).
    rate: float = 20.0
    burst: float = 40.0
    max_connections: int = 10
    header_timeout: float = 5.0
    body_timeout: float = 10.0
    # Bans after a block, for the full guard (0, its default: none; a false positive would
    # otherwise lock a benign client out).
    ban_seconds: float = 0.0
    # The full guard's surge defence: during a surge (the server's rate above 4x its baseline
    # and above 1,000 requests/s, about 5x this benign load's), a client new to the server gets
    # 5 requests/s, a benign client's highest rate.
    surge_rate: float = 5.0
    surge_min_rate: float = 1000.0


def config_toml(name: str, settings: LiveSettings) -> str:
    """The server's config for ``name`` (one of :data:`CONFIGS`)."""
    text = f'[models.xor]\npath = "{XOR}"\n\n[[routes]]\npath = "/"\nreturn = 200\nbody = "ok"\n'
    if name == "none":
        return text
    s = settings
    text += (
        f"\n[server.limits]\nheader_timeout = {s.header_timeout}\n"
        f"body_timeout = {s.body_timeout}\n"
        f'\n[guard]\nmode = "enforce"\nrate = {s.rate}\nburst = {s.burst}\n'
        f'max_connections = {s.max_connections}\nallow = ["{SCRAPER}"]\n'
    )
    if name == "bucket":
        return text + 'model = "none"\n'
    if name == "monitor":
        text = text.replace('mode = "enforce"', 'mode = "monitor"')
    text += f"ban_seconds = {s.ban_seconds}\n"
    if s.surge_rate > 0:
        text += f"surge_rate = {s.surge_rate}\nsurge_min_rate = {s.surge_min_rate}\n"
    return text


# -- processes ------------------------------------------------------------------------------------


def pinning_available() -> bool:
    try:
        cores = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return False
    return shutil.which("taskset") is not None and {SERVER_CORE, LOAD_CORE} <= cores


def pin(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if pinning_available() else []


def server_cpus() -> int | None:
    """The server's core for taskset, when pinning is available."""
    return SERVER_CORE if pinning_available() else None


class LiveServer:
    """``webtorch serve`` in a subprocess on a free port (webtorch_harness), pinned to the
    server's core."""

    def __init__(self, name: str, settings: LiveSettings, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir / f"server-{name}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "webtorch.toml"
        config.write_text(config_toml(name, settings))
        try:
            self.server = harness.serve(config, workdir=self.workdir, cpus=server_cpus())
        except harness.HarnessError as exc:
            raise RuntimeError(str(exc)) from None
        assert self.server.port is not None
        self.port: int = self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    def cpu(self) -> float:
        """User + system CPU seconds of the server so far (from /proc)."""
        return self.server.cpu_times(session=False).total

    def get(self, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
        return http_get(self.port, path, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        status, body = self.get("/metrics")
        return parse_metrics(body.decode()) if status == 200 else {}

    def responsive(self) -> bool:
        try:
            return self.get("/v2/health/ready")[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.server.close(timeout=5.0)  # a graceful drain; what it does is not measured here


@contextmanager
def live_server(name: str, settings: LiveSettings, workdir: Path) -> Iterator[LiveServer]:
    server = LiveServer(name, settings, workdir)
    try:
        yield server
    finally:
        server.stop()


def http_get(
    port: int, path: str, source: str = SCRAPER, timeout: float = 3.0
) -> tuple[int, bytes]:
    """One GET from ``source``: (status, body)."""
    with socket.socket() as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        buf = b""
        while (parsed := live_load.parse_response(buf)) is None:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before an answer")
            buf += chunk
        status, total, _ = parsed
        return status, buf[buf.find(b"\r\n\r\n") + 4 : total]


_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*(?:\{[^}]*\})?) (\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out[match.group(1)] = float(match.group(2))
    return out


_STATUS = re.compile(r'status="(\d+)"')
_DECISION = re.compile(r'action="(\w+)",reason="(\w+)"')


def status_counts(metrics: dict[str, float]) -> Counter[int]:
    """Answers by status, the harness's own scrapes left out."""
    counts: Counter[int] = Counter()
    for key, value in metrics.items():
        if key.startswith("webtorch_http_requests_total{") and 'route="/metrics"' not in key:
            match = _STATUS.search(key)
            if match:
                counts[int(match.group(1))] += int(value)
    return counts


def decisions(metrics: dict[str, float]) -> dict[str, int]:
    """The guard's refusals by action and reason ("throttle/rate_limit": n)."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("webtorch_guard_decisions_total{"):
            match = _DECISION.search(key)
            if match and match.group(1) != "allow" and value:
                out[f"{match.group(1)}/{match.group(2)}"] = int(value)
    return out


class Generator:
    """One ``live_load`` role in its own process, pinned to the load core."""

    _count = 0

    def __init__(self, spec: dict[str, Any], workdir: Path, nice: int = 0) -> None:
        Generator._count += 1
        self.out = workdir / f"load-{Generator._count}-{spec['role']}.json"
        path = workdir / f"load-{Generator._count}-{spec['role']}.spec.json"
        path.write_text(json.dumps({**spec, "out": str(self.out)}))
        prefix = pin(LOAD_CORE)
        if nice and shutil.which("nice"):
            prefix += ["nice", "-n", str(nice)]
        # -I: the generator imports nothing of WebTorch's package (which imports torch).
        cmd = [*prefix, sys.executable, "-I", live_load.__file__, str(path)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise RuntimeError(f"load generator {self.out.name} ran past {timeout} s") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"load generator failed: {err.decode(errors='replace')[-2000:]}")
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result


def addresses(block: int, n: int) -> list[str]:
    """``n`` source addresses 127.<block>.x.y (x.y from .0.1 on, skipping .0 and .255)."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        i += 1
        hi, lo = divmod(i, 256)
        if 0 < lo < 255:
            out.append(f"127.{block}.{hi}.{lo}")
    return out


BENIGN_BLOCK, FLOOD_BLOCK, COST_BLOCK = 10, 20, 30


def benign_spec(settings: LiveSettings, port: int, t0: float, duration: float) -> dict[str, Any]:
    lo, hi = settings.benign_rate
    return {
        "role": "benign",
        "port": port,
        "t0": t0,
        "duration": duration,
        "clients": addresses(BENIGN_BLOCK, settings.benign_clients),
        "rate_min": lo,
        "rate_max": hi,
        "timeout": settings.timeout,
        "seed": 1,
    }


# -- measures ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


@dataclass(frozen=True)
class BenignStats:
    requests: int
    ok: int  # 2xx
    p50: float  # seconds, over every request (a failure counts with its time)
    p99: float
    statuses: dict[str, int]  # what the failures were

    @property
    def success(self) -> float:
        return self.ok / self.requests if self.requests else float("nan")


def benign_stats(records: Sequence[Sequence[float]], start: float, end: float) -> BenignStats:
    """Benign requests planned within [start, end) seconds of the run's start."""
    window = [r for r in records if start <= r[0] < end]
    latencies = [r[1] for r in window]
    ok = sum(1 for r in window if 200 <= r[2] < 300)
    failures: Counter[str] = Counter()
    for r in window:
        status = int(r[2])
        if not 200 <= status < 300:
            failures[
                "timeout"
                if status == live_load.TIMEOUT
                else "no answer"
                if status == live_load.CONNECT_ERROR
                else str(status)
            ] += 1
    return BenignStats(
        len(window),
        ok,
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        dict(failures),
    )


@dataclass(frozen=True)
class FloodStats:
    duration: float
    totals: dict[str, int]  # answers by outcome (live_load.OUTCOMES)
    first_refusal: float | None  # seconds from the flood's start to its first 429, 403 or reset
    served_before: int | None  # attacker 2xx before that
    first_throttle: float | None  # to its first 429 or reset (refusals by rate or by count)
    served_before_throttle: int | None
    refused90: float | None  # seconds until >= 90% of attacker requests are refused (for 0.5 s)
    served_per_s: float  # attacker 2xx/s over the flood
    attempts_per_s: float  # attacker answers (and refused connections)/s

    @property
    def refused_share(self) -> float:
        total = sum(self.totals.values())
        refused = sum(self.totals[k] for k in ("throttled", "blocked", "dropped"))
        return refused / total if total else float("nan")


def flood_stats(result: dict[str, Any], duration: float, skip: float = 0.0) -> FloodStats:
    """The flood's outcomes; ``skip``: seconds at its start left out of the rates."""
    step = float(result["bin"])
    bins: list[list[int]] = result["bins"]
    totals = {name: sum(b[i] for b in bins) for i, name in enumerate(live_load.OUTCOMES)}
    refused90 = None
    span = max(1, round(0.5 / step))
    for i in range(len(bins)):
        window = bins[i : i + span]
        total = sum(sum(b) for b in window)
        refused = sum(
            b[live_load.THROTTLED] + b[live_load.BLOCKED] + b[live_load.DROPPED] for b in window
        )
        if total and refused >= 0.9 * total:
            refused90 = round(i * step, 3)
            break
    first = round(int(skip / step)), len(bins)
    measured = bins[first[0] : first[1]]
    seconds = max(duration - skip, 1e-9)
    return FloodStats(
        duration,
        totals,
        result["first_refusal"],
        result["served_before"],
        result["first_throttle"],
        result["served_before_throttle"],
        refused90,
        sum(b[live_load.OK] for b in measured) / seconds,
        sum(sum(b) for b in measured) / seconds,
    )


# -- scenarios --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloodResult:
    config: str
    control: BenignStats
    during: BenignStats  # benign load during the flood
    after: BenignStats  # benign load after it
    flood: FloodStats
    decisions: dict[str, int]
    responsive: bool


def flood_scenario(settings: LiveSettings, config: str, workdir: Path) -> FloodResult:
    """Benign clients alone (control), then with the keep-alive flood."""
    s = settings
    with live_server(config, s, workdir) as server:
        t0 = time.monotonic() + 0.5
        control = Generator(benign_spec(s, server.port, t0, s.control), workdir)
        records = control.result(s.control + s.timeout + 30)["records"]
        control_stats = benign_stats(records, 0.5, s.control)
        length = s.flood_start + s.flood_duration + s.flood_after
        t0 = time.monotonic() + 0.5
        benign = Generator(benign_spec(s, server.port, t0, length), workdir)
        attack = Generator(
            {
                "role": "flood",
                "port": server.port,
                "t0": t0 + s.flood_start,
                "duration": s.flood_duration,
                "addresses": addresses(FLOOD_BLOCK, s.flood_addresses),
                "per_address": s.flood_per_address,
                "seed": 2,
            },
            workdir,
            nice=10,  # the benign clients, sharing its core, are served first
        )
        flood_result = attack.result(length + s.timeout + 30)
        records = benign.result(length + s.timeout + 30)["records"]
        end = s.flood_start + s.flood_duration
        return FloodResult(
            config,
            control_stats,
            benign_stats(records, s.flood_start, end),
            benign_stats(records, end, length),
            flood_stats(flood_result, s.flood_duration),
            decisions(server.metrics()),
            server.responsive(),
        )


@dataclass(frozen=True)
class ToolResult:
    """An attack by a Debian tool (goldeneye, slowhttptest) with benign load alongside."""

    config: str
    tool: str
    benign: BenignStats
    attacker_ok: int  # the server's 2xx answers to the attacker (its total minus the benign ones)
    attacker_refused: int  # its 429 and 403 answers to the attacker
    first_refusal: float | None  # seconds into the attack of the first refusal, to a scrape
    served_before: int | None  # attacker 2xx before it (to a scrape)
    peak_connections: int  # the server's open connections, most seen
    responsive: bool  # the server answered a health check after the attack
    decisions: dict[str, int]
    note: str


def _refusals(counts: Counter[int], decided: dict[str, int]) -> int:
    connections = sum(v for k, v in decided.items() if k.endswith(("/connections", "/banned")))
    return counts[429] + counts[403] + connections


def tool_scenario(
    settings: LiveSettings,
    config: str,
    workdir: Path,
    tool: str,
    command: Command,
    duration: float,
) -> ToolResult:
    """Run ``command(url, workdir, config)`` for ``duration`` seconds with benign clients alongside;
    the server's /metrics, scraped every 0.25 s, says what the attacker got."""
    s = settings
    with live_server(config, s, workdir) as server:
        t0 = time.monotonic() + 0.5
        length = duration + 3.0
        benign = Generator(benign_spec(s, server.port, t0, length), workdir)
        before = status_counts(server.metrics())
        time.sleep(max(0.0, t0 + 1.0 - time.monotonic()))
        started = time.monotonic()
        # In a session of its own (the harness's way): the tool forks, and all of it is stopped.
        proc = harness.start(
            command(server.url, workdir, config),
            log=workdir / f"{tool}-{config}.log",
            cwd=workdir,
            cpus=LOAD_CORE if pinning_available() else None,
        )
        series: list[tuple[float, Counter[int], dict[str, int], int]] = []
        try:
            while time.monotonic() - started < duration and proc.poll() is None:
                try:
                    m = server.metrics()
                except OSError:
                    m = {}
                if m:
                    series.append(
                        (
                            time.monotonic() - started,
                            status_counts(m) - before,
                            decisions(m),
                            int(m.get("webtorch_http_connections", 0)),
                        )
                    )
                time.sleep(0.25)
        finally:
            proc.close(signal.SIGKILL)
        records = benign.result(length + s.timeout + 30)["records"]
        after = server.metrics()
        responsive = server.responsive()
    attack_start = started - t0
    window = benign_stats(records, attack_start, attack_start + duration)
    counts = status_counts(after) - before

    def benign_until(at: float) -> tuple[int, int]:
        """Benign 2xx and refusals (429, 403) planned before ``at`` s into the attack."""
        until = attack_start + at
        ok = sum(1 for r in records if r[0] < until and 200 <= r[2] < 300)
        return ok, sum(1 for r in records if r[0] < until and r[2] in (429, 403))

    first_refusal = served_before = None
    for at, seen, decided, _ in series:
        ok, refused = benign_until(at)
        if _refusals(seen, decided) - refused > 0:
            first_refusal = round(at, 2)
            served_before = max(0, sum(v for k, v in seen.items() if 200 <= k < 300) - ok)
            break
    ok, refused = benign_until(length)
    decided = decisions(after)
    return ToolResult(
        config,
        tool,
        window,
        max(0, sum(v for k, v in counts.items() if 200 <= k < 300) - ok),
        max(0, _refusals(counts, decided) - refused),
        first_refusal,
        served_before,
        max((c for *_, c in series), default=0),
        responsive,
        decided,
        _tool_note(tool, workdir, config),
    )


def _tool_note(slug: str, workdir: Path, config: str) -> str:
    """The tool's own view of the run: goldeneye's hit count, slowhttptest's socket states."""
    csv = workdir / f"{slug}-{config}.csv"
    if csv.exists():
        rows = [line.split(",") for line in csv.read_text().splitlines()[1:] if line.strip()]
        try:
            connected = max(int(r[3]) for r in rows)
            closed = max(int(r[1]) for r in rows)
        except (IndexError, ValueError):
            return "no statistics"
        return f"its sockets: at most {connected} connected at once, {closed} closed"
    text = (workdir / f"{slug}-{config}.log").read_text(errors="replace")
    hits = re.findall(r"(\d+) GoldenEye strikes hit. \((\d+) Failed\)", text)
    return f"its count: {hits[-1][0]} hits, {hits[-1][1]} failed" if hits else ""


Command = Callable[[str, Path, str], list[str]]  # (server url, workdir, config) -> argv


GOLDENEYE_FIX = ("len(acceptEncoding)/2", "len(acceptEncoding)//2")


def goldeneye_command(settings: LiveSettings) -> Command:
    """Debian's goldeneye (1.2.0+git20191230) fails every request on Python >= 3.10: it calls
    ``random.randint(1, len(acceptEncoding)/2)`` with a float. A copy with that one division made
    an integer division runs; nothing else is changed."""

    def command(url: str, workdir: Path, config: str) -> list[str]:
        script = workdir / "goldeneye.py"
        if not script.exists():
            source = Path(shutil.which("goldeneye") or "/usr/bin/goldeneye").read_text()
            script.write_text(source.replace(*GOLDENEYE_FIX))
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        return [
            python,
            "-u",
            str(script),
            url + "/",
            "-w",
            str(settings.goldeneye_workers),
            "-s",
            str(settings.goldeneye_sockets),
            "-m",
            "random",
        ]

    return command


def slowhttptest_command(settings: LiveSettings, mode: str, slug: str) -> Command:
    """slowhttptest in ``mode`` (-H slowloris, -B slow POST), its statistics to a CSV file."""
    s = settings

    def command(url: str, workdir: Path, config: str) -> list[str]:
        return [
            "slowhttptest",
            mode,
            "-c",
            str(s.slow_connections),
            "-r",
            str(s.slow_rate),
            "-i",
            str(s.slow_interval),
            "-l",
            str(int(s.slow_duration) + 5),
            "-s",
            "8192",
            "-u",
            url + "/",
            "-p",
            "3",
            "-g",
            "-o",
            str(workdir / f"{slug}-{config}"),
        ]

    return command


def attacks(settings: LiveSettings) -> list[tuple[str, str, str, float, Command]]:
    """(slug, name, Debian package, seconds, command) of each tool attack."""
    s = settings
    out: list[tuple[str, str, str, float, Command]] = []
    if s.goldeneye > 0:
        out.append(("goldeneye", "goldeneye", "goldeneye", s.goldeneye, goldeneye_command(s)))
    if s.slow_duration > 0:
        for slug, name, mode in (("slowloris", "slowloris", "-H"), ("slowpost", "slow POST", "-B")):
            command = slowhttptest_command(s, mode, slug)
            out.append((slug, name, "slowhttptest", s.slow_duration, command))
    return out


@dataclass(frozen=True)
class CostResult:
    config: str
    round: int
    moderate: BenignStats  # the open-loop run at settings.cost_rate
    cpu_us: float  # server CPU per request answered in the open-loop run
    saturation_answers: float  # answers/s in the closed-loop saturation run
    saturation_rps: float  # of them 2xx/s
    saturation_cpu_us: float  # server CPU per request answered there
    saturation_util: float  # server CPU / wall time during it (1.0: its core was full)
    refused: int  # requests the guard refused in both runs (monitor: would have refused)

    @property
    def capacity(self) -> float:
        """Answers per second of server CPU: what one full core would answer."""
        return 1e6 / self.saturation_cpu_us if self.saturation_cpu_us > 0 else float("nan")


def cost_scenario(
    settings: LiveSettings, configs: Sequence[str], workdir: Path
) -> list[CostResult]:
    """Every config's server at once (idle ones cost nothing), measured in turn, round after
    round: the machine's drift lands on all configs alike rather than on whichever ran last.

    Without the surge defence: the saturation run is 2,000 addresses new to the server sending
    as fast as they are answered, which is what a surge is, and refusing it would measure the
    price of 429s rather than of scoring benign traffic."""
    s = dataclasses.replace(settings, surge_rate=0.0)
    results = []
    with ExitStack() as stack:
        servers = [stack.enter_context(live_server(c, s, workdir)) for c in configs]
        spread = addresses(COST_BLOCK, s.cost_addresses)
        for server in servers:  # warm-up: caches, the allocator, the detector's part cache
            t0 = time.monotonic() + 0.5
            spec = _open_spec(s, server.port, t0, 1.0, spread, 3)
            Generator(spec, workdir).result(30 + s.timeout)
        for round_ in range(1, s.cost_rounds + 1):
            for server in servers:
                results.append(_cost_once(s, server, workdir, round_, spread))
    return results


def _open_spec(
    s: LiveSettings, port: int, t0: float, duration: float, spread: list[str], seed: int
) -> dict[str, Any]:
    return {
        "role": "open",
        "port": port,
        "t0": t0,
        "duration": duration,
        "rate": s.cost_rate,
        "addresses": spread,
        "timeout": s.timeout,
        "seed": seed,
    }


def _cost_once(
    s: LiveSettings, server: LiveServer, workdir: Path, round_: int, spread: list[str]
) -> CostResult:
    decided = sum(decisions(server.metrics()).values())
    t0 = time.monotonic() + 0.5
    run = Generator(_open_spec(s, server.port, t0, s.cost_duration, spread, 3 + round_), workdir)
    time.sleep(max(0.0, t0 - time.monotonic()))
    cpu0 = server.cpu()
    records = run.result(s.cost_duration + s.timeout + 30)["records"]
    cpu1 = server.cpu()
    moderate = benign_stats(records, 0.0, s.cost_duration)
    answered = sum(1 for r in records if r[2] >= 100)
    settle = 1.0  # the connections are opened, every one has a request in flight
    t0 = time.monotonic() + 0.5
    saturate = Generator(
        {
            "role": "flood",
            "port": server.port,
            "t0": t0,
            "duration": settle + s.saturation_duration,
            "addresses": addresses(COST_BLOCK + 1, s.saturation_addresses),
            "per_address": 1,
            "seed": 5,
        },
        workdir,
    )
    time.sleep(max(0.0, t0 + settle - time.monotonic()))
    wall0, cpu2 = time.monotonic(), server.cpu()
    time.sleep(s.saturation_duration)
    wall1, cpu3 = time.monotonic(), server.cpu()
    result = saturate.result(settle + s.saturation_duration + 30)
    stats = flood_stats(result, settle + s.saturation_duration, settle)
    refused = sum(decisions(server.metrics()).values()) - decided
    busy = cpu3 - cpu2
    answers = stats.attempts_per_s * (wall1 - wall0)
    return CostResult(
        server.name,
        round_,
        moderate,
        (cpu1 - cpu0) / max(answered, 1) * 1e6,
        stats.attempts_per_s,
        stats.served_per_s,
        busy / max(answers, 1) * 1e6,
        busy / (wall1 - wall0),
        refused,
    )


def check_cost(seed: int = 1, repeat: int = 20) -> dict[str, float]:
    """Microseconds per :meth:`Guard.check` in-process, on the benign mix from 200 clients: the
    bucket alone and with the shipped detector (no network, no server: the decision's own cost)."""
    from webtorch.guard.build import DEFAULT_MODEL
    from webtorch.guard.core import Guard
    from webtorch.guard.scorer import Scorer

    views = [view_of_raw(raw) for raw in live_load.request_pool(seed)]
    clients = [f"127.1.0.{i}" for i in range(1, 201)]
    out = {}
    for name, scorer in (("bucket", None), ("guard", Scorer.from_file(DEFAULT_MODEL))):
        guard = Guard(GuardConfig(mode="enforce", rate=1e9, burst=1e9), scorer)
        now = 0.0
        started = time.perf_counter()
        for _ in range(repeat):
            for i, view in enumerate(views):
                now += 0.0005
                guard.check(view, clients[i % len(clients)], now)
        out[name] = (time.perf_counter() - started) / (repeat * len(views)) * 1e6
    return out


# -- everything -------------------------------------------------------------------------------


@dataclass
class LiveResults:
    settings: LiveSettings
    pinned: bool
    floods: list[FloodResult] = field(default_factory=list)
    tools: list[ToolResult] = field(default_factory=list)
    costs: list[CostResult] = field(default_factory=list)
    mix: MixScores | None = None  # the detector's verdicts on the benign mix, offline
    check_us: dict[str, float] = field(default_factory=dict)  # Guard.check alone, in-process
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_live(
    settings: LiveSettings | None = None,
    configs: Sequence[str] = CONFIGS,
    cost_configs: Sequence[str] = COST_CONFIGS,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> LiveResults:
    s = settings or LiveSettings()
    results = LiveResults(s, pinning_available())
    started = time.monotonic()
    try:
        previous = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        previous = None
    if results.pinned:
        os.sched_setaffinity(0, {LOAD_CORE})  # the harness keeps off the server's core
    else:
        results.notes.append("taskset or a second core is missing: nothing was pinned")
    try:
        with tempfile.TemporaryDirectory(prefix="webtorch-live-") as tmp:
            workdir = Path(tmp)
            for config in configs:
                progress(f"flood vs {config}...")
                results.floods.append(flood_scenario(s, config, workdir))
            for slug, name, package, duration, command in attacks(s):
                if shutil.which(package) is None:
                    results.notes.append(
                        f"{name}: `{package}` is not installed "
                        f"(apt-get install -y {package}); skipped"
                    )
                    continue
                for config in configs:
                    progress(f"{name} vs {config}...")
                    result = tool_scenario(s, config, workdir, slug, command, duration)
                    results.tools.append(replace(result, tool=name))
            if s.cost_rounds > 0 and cost_configs:
                progress(f"cost: {', '.join(cost_configs)} x {s.cost_rounds} rounds...")
                results.costs = cost_scenario(s, cost_configs, workdir)
                if results.pinned:
                    os.sched_setaffinity(0, {SERVER_CORE})  # as the server runs
                results.check_us = check_cost()
    finally:
        if previous is not None and results.pinned:
            os.sched_setaffinity(0, previous)
    if any(c in ("guard", "monitor") for c in (*configs, *cost_configs)):
        results.mix = score_benign_mix()
    results.seconds = time.monotonic() - started
    return results


# -- the detector on the benign mix -----------------------------------------------------------


def view_of_raw(raw: bytes) -> Any:
    """A raw request of :func:`live_load.request_pool` as the guard's RequestView."""
    from webtorch.guard.features import RequestView

    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ", 2)
    path, _, query = target.decode().partition("?")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return RequestView(method.decode(), path, query, headers, body)


@dataclass(frozen=True)
class MixScores:
    """The shipped detector's verdicts on the benign mix, each request from a fresh client."""

    requests: int
    with_query: int
    blocked: int  # injection or abuse score >= block
    blocked_with_query: int
    throttled: int  # abuse score in [throttle, block)
    # By the query's first parameter ("-": no query): (blocked, requests).
    by_param: dict[str, tuple[int, int]] = field(default_factory=dict)


def score_benign_mix(seed: int = 1) -> MixScores:
    """At the config's default thresholds (those the live eval's full guard runs with)."""
    from webtorch.guard.build import DEFAULT_MODEL
    from webtorch.guard.clients import ClientState
    from webtorch.guard.scorer import Scorer

    defaults = GuardConfig()
    throttle, block = defaults.throttle, defaults.block
    scorer = Scorer.from_file(DEFAULT_MODEL)
    requests = with_query = blocked = blocked_query = throttled = 0
    by_param: dict[str, tuple[int, int]] = {}
    for raw in live_load.request_pool(seed):
        view = view_of_raw(raw)
        state = ClientState(0.0)
        state.connections = 1
        state.arrive(view.path, 0.0)
        injection, abuse = scorer.score_one(view, state.features(0.0))
        requests += 1
        with_query += bool(view.query)
        hit = max(injection, abuse) >= block
        if hit:
            blocked += 1
            blocked_query += bool(view.query)
        elif abuse >= throttle:
            throttled += 1
        param = view.query.partition("=")[0] or "-"
        seen = by_param.get(param, (0, 0))
        by_param[param] = (seen[0] + hit, seen[1] + 1)
    return MixScores(requests, with_query, blocked, blocked_query, throttled, by_param)


# -- the report -------------------------------------------------------------------------------


def live_report(results: LiveResults, command: str) -> str:
    """The ``## Live attacks`` section of GUARD_RESULTS.md (tables in ``live_tables.py``)."""
    from webtorch_guardlab.live_tables import report

    return report(results, command)


def merge_section(text: str, section: str) -> str:
    """``text`` (a GUARD_RESULTS.md) with its ``## Live attacks`` section replaced by
    ``section``, or ``section`` appended."""
    start = text.find(LIVE_HEADING + "\n")
    if start < 0:
        return text.rstrip() + "\n\n" + section if text.strip() else section
    end = text.find("\n## ", start + len(LIVE_HEADING))
    rest = text[end + 1 :] if end >= 0 else ""
    return text[:start] + section + ("\n" + rest if rest else "")


def live_section(text: str) -> str | None:
    """The ``## Live attacks`` section of ``text``, if it has one."""
    start = text.find(LIVE_HEADING + "\n")
    if start < 0:
        return None
    end = text.find("\n## ", start + len(LIVE_HEADING))
    return (text[start:end] if end >= 0 else text[start:]).rstrip("\n") + "\n"


def carry_live_section(old: str, new: str) -> str:
    """``new`` with ``old``'s live section, when ``new`` has none: an offline-only eval keeps
    the live results of an earlier ``--live`` run."""
    section = live_section(old)
    if section is None or live_section(new) is not None:
        return new
    return merge_section(new, section)
