"""Failover under load: kill -9 one of three upstreams behind a proxy, restart it, count errors.

    .venv/bin/python benchmarks/failover.py [--duration S] [--kill-at S] [--restart-at S]
        [--connections N] [--timeout S] [--repeat N] [--targets KEYS] [--output FILE]

Three upstreams, each an nginx ``return 200`` in one process (``master_process off``) that names
itself (``X-Upstream: up1``...), run on CPU 1 with the load client; the proxy under test runs alone
on CPU 0, one after the other with the same scenario: nginx ``proxy_pass`` (``max_fails=1
fail_timeout=10s``, ``proxy_next_upstream error timeout``, keep-alive pool), ``webtorch serve``
with the same upstream group plus an active health check every second (the configurations of
``benchmarks/proxy.py``; WebTorch's outlier ejection on, as by default), and the same WebTorch
with outlier ejection off. The client is this script: one thread on CPU 1, ``--connections``
keep-alive connections, each with one GET / in flight (closed loop), that records every request's
outcome in 100 ms buckets: a 2xx answer by the upstream that served it, a non-2xx status, or an
error (the connection reset or closed with the request in flight, a failed connect, or no answer
within ``--timeout`` seconds). It also samples the proxy's CPU time every second.

The scenario: after a 1 s warm-up, load for ``--duration`` seconds; at ``--kill-at`` s ``kill -9``
the upstream up2; at ``--restart-at`` s start it again on the same port. Reported: the
client-visible errors (non-2xx + socket errors + timeouts) out of all requests, the time from the
restart to the first answer from up2 through the proxy, a per-second timeline of each upstream's
share, and what each proxy logged about up2. The results replace the section between the
failover markers in BENCHMARKS.md (appended at the end when missing); the rest is left alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import re
import selectors
import signal
import socket
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from proxy import (
    ProxyCommand,
    nginx_proxy_command,
    upstream_command,
    verdict,
    versions,
    wait_for_get,
    webtorch_proxy_command,
)
from run import (
    CLIENT_CPU,
    ROOT,
    SERVER_CPU,
    BenchError,
    check_proxy_environment,
    command_line,
    cpu_model,
    failure_lines,
    find_tool,
    free_port,
    in_rounds,
    log_tail,
    replace_section,
    run_main,
    running,
    terminate_on_sigterm,
    tool_version,
)

import webtorch_harness as harness

MARK_START = "<!-- failover:start -->"
MARK_END = "<!-- failover:end -->"
UPSTREAMS = ("up1", "up2", "up3")
VICTIM = "up2"
BUCKET_S = 0.1  # the client's time resolution
WARMUP_S = 1.0
RECONNECT_DELAY_S = 0.01  # after a failed connect
SHARE_WINDOW_S = 5.0  # the victim's share: over the run's last seconds, all after the restart

HEAD_END = b"\r\n\r\n"
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
UPSTREAM = re.compile(rb"\r\nx-upstream:[ \t]*([\w.-]+)", re.IGNORECASE)


@dataclass(frozen=True)
class FailoverTarget:
    key: str
    label: str
    command: ProxyCommand
    error_log: str | None = None  # a log file the proxy writes in the scratch directory


TARGETS = [
    # nginx_proxy_command's default name is "nginx-proxy": its error log is nginx-proxy-error.log.
    FailoverTarget("nginx", "nginx `proxy_pass`", nginx_proxy_command, "nginx-proxy-error.log"),
    FailoverTarget("webtorch", "WebTorch proxy", webtorch_proxy_command),
    FailoverTarget(
        "webtorch-no-outlier",
        "WebTorch proxy, outlier ejection off",
        lambda port, upstreams, workdir: webtorch_proxy_command(
            port, upstreams, workdir, "webtorch-proxy-no-outlier", outlier=False
        ),
    ),
]
TARGET_KEYS = [t.key for t in TARGETS]


# --- the load client -------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    upstream: str | None
    close: bool  # the server said Connection: close


def take_response(buf: bytearray) -> Response | None:
    """Remove one whole response from the front of ``buf``; None while it is incomplete."""
    end = buf.find(HEAD_END)
    if end < 0:
        return None
    head = bytes(buf[: end + 2])  # keep the last CRLF so every header line starts with one
    start = end + 4
    if (length := CONTENT_LENGTH.search(head)) is not None:
        total = start + int(length.group(1))
        if len(buf) < total:
            return None
    elif CHUNKED.search(head) is not None:
        found = chunked_end(buf, start)
        if found is None:
            return None
        total = found
    else:
        total = start  # no body: 204, 304, or a response this client does not expect
    del buf[:total]
    upstream = UPSTREAM.search(head)
    return Response(
        status=int(head[9:12]),
        upstream=upstream.group(1).decode() if upstream else None,
        close=CLOSE.search(head) is not None,
    )


def chunked_end(buf: bytearray, at: int) -> int | None:
    """Where a chunked body starting at ``at`` ends (after its last chunk and trailer)."""
    while True:
        line_end = buf.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(bytes(buf[at:line_end]).split(b";")[0], 16)
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", line_end)
            return trailer_end + 4 if trailer_end >= 0 else None
        at = line_end + 2 + size + 2
        if len(buf) < at:
            return None


@dataclass
class Conn:
    sock: socket.socket | None = None
    buf: bytearray = dataclasses.field(default_factory=bytearray)
    sent_at: float | None = None  # when the request in flight was sent
    reconnect_at: float = 0.0  # when to try again after a failed connect


class LoadClient:
    """Keep-alive connections, each with one GET in flight, driven from one thread; every
    request's outcome goes into ``BUCKET_S`` buckets counted from ``self.t0``."""

    def __init__(self, port: int, connections: int, timeout: float) -> None:
        self.address = ("127.0.0.1", port)
        self.request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        self.timeout = timeout
        self.selector = selectors.DefaultSelector()
        self.conns = [Conn() for _ in range(connections)]
        self.t0 = time.monotonic()
        self.buckets: dict[int, Counter[str]] = {}
        self.max_latency: dict[int, float] = {}
        self.latencies: list[float] = []
        self.first_after: dict[str, float] = {}  # upstream -> first answer after ``watch_from``
        self.watch_from: dict[str, float] = {}  # upstream -> elapsed time to watch from

    def reset(self) -> None:
        """Start counting afresh from now, keeping the connections open."""
        self.t0 = time.monotonic()
        self.buckets.clear()
        self.max_latency.clear()
        self.latencies.clear()
        self.first_after.clear()
        self.watch_from.clear()

    def record(self, key: str, now: float, latency: float | None = None) -> None:
        bucket = int((now - self.t0) / BUCKET_S)
        self.buckets.setdefault(bucket, Counter())[key] += 1
        if latency is not None:
            self.latencies.append(latency)
            if latency > self.max_latency.get(bucket, 0.0):
                self.max_latency[bucket] = latency

    def open(self, conn: Conn, now: float) -> None:
        try:
            sock = socket.create_connection(self.address, timeout=1.0)
        except OSError:
            self.record("error:connect", now)
            conn.reconnect_at = now + RECONNECT_DELAY_S
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock = sock
        self.selector.register(sock, selectors.EVENT_READ, conn)
        self.send(conn, now)

    def drop(self, conn: Conn) -> None:
        if conn.sock is not None:
            self.selector.unregister(conn.sock)
            conn.sock.close()
        conn.sock, conn.sent_at = None, None
        conn.buf.clear()

    def fail(self, conn: Conn, kind: str, now: float) -> None:
        """The request in flight on ``conn`` failed: count it, open a new connection."""
        self.record(f"error:{kind}", now)
        self.drop(conn)
        self.open(conn, now)

    def send(self, conn: Conn, now: float) -> None:
        assert conn.sock is not None
        try:
            conn.sock.sendall(self.request)
        except OSError:
            self.fail(conn, "reset", now)
            return
        conn.sent_at = now

    def receive(self, conn: Conn, now: float) -> None:
        assert conn.sock is not None
        try:
            data = conn.sock.recv(65536)
        except OSError:
            self.fail(conn, "reset", now)
            return
        if not data:
            self.fail(conn, "closed", now)
            return
        conn.buf += data
        try:
            response = take_response(conn.buf)
        except ValueError:
            self.fail(conn, "bad response", now)
            return
        if response is None:
            return
        latency = now - conn.sent_at if conn.sent_at is not None else None
        if 200 <= response.status < 300:
            name = response.upstream or "unnamed"
            self.record(name, now, latency)
            since = self.watch_from.get(name)
            if since is not None and name not in self.first_after:
                self.first_after[name] = now - self.t0 - since
        else:
            self.record(f"status:{response.status}", now, latency)
        if response.close:
            self.drop(conn)
            self.open(conn, now)
        else:
            self.send(conn, now)

    def check(self, now: float) -> None:
        """Time out requests without an answer; retry failed connects that are due."""
        for conn in self.conns:
            if conn.sock is None:
                if now >= conn.reconnect_at:
                    self.open(conn, now)
            elif conn.sent_at is not None and now - conn.sent_at > self.timeout:
                self.fail(conn, "timeout", now)

    def run(self, seconds: float, actions: list[tuple[float, Callable[[], None]]]) -> None:
        """Load for ``seconds`` from ``self.t0``, running each action at its time (seconds from
        ``self.t0``) between two rounds of reads."""
        pending = sorted(actions, key=lambda a: a[0])
        next_check = 0.0
        for conn in self.conns:
            if conn.sock is None:
                self.open(conn, time.monotonic())
        while True:
            now = time.monotonic()
            elapsed = now - self.t0
            if elapsed >= seconds:
                return
            while pending and pending[0][0] <= elapsed:
                pending.pop(0)[1]()
            if now >= next_check:
                self.check(now)
                next_check = now + 0.02
            for key, _ in self.selector.select(0.005):
                self.receive(key.data, time.monotonic())

    def close(self) -> None:
        for conn in self.conns:
            self.drop(conn)
        self.selector.close()


# --- one scenario ----------------------------------------------------------------------------


@dataclass
class FailoverResult:
    target: FailoverTarget
    buckets: dict[int, Counter[str]] = dataclasses.field(default_factory=dict)
    max_latency: dict[int, float] = dataclasses.field(default_factory=dict)
    latencies: list[float] = dataclasses.field(default_factory=list)
    killed_at: float | None = None  # seconds into the run, as done
    restarted_at: float | None = None
    returned_after: float | None = None  # restart -> the first answer from the victim
    seconds: float = 0.0
    started: float = 0.0  # time.time() when the measured load began, for the log lines
    cpu_samples: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    log_lines: list[str] = dataclasses.field(default_factory=list)  # about the victim
    error: str | None = None

    def cpu_use(self, second: int) -> float | None:
        """The proxy's CPU use (1.0: its whole core) from ``second`` to the next, sampled."""
        before = [(t, c) for t, c in self.cpu_samples if t <= second + 0.05]
        after = [(t, c) for t, c in self.cpu_samples if t >= second + 0.95]
        if not before or not after:
            return None
        (t0, c0), (t1, c1) = before[-1], after[0]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else None

    @property
    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in self.buckets.values():
            total.update(counts)
        return total

    @property
    def requests(self) -> int:
        return sum(self.totals.values())

    def count(self, prefix: str) -> int:
        return sum(n for key, n in self.totals.items() if key.startswith(prefix))

    @property
    def non_2xx(self) -> int:
        return self.count("status:")

    @property
    def timeouts(self) -> int:
        return self.totals["error:timeout"]

    @property
    def socket_errors(self) -> int:
        return self.count("error:") - self.timeouts

    @property
    def client_errors(self) -> int:
        return self.non_2xx + self.count("error:")

    def share(self, name: str, start: float, end: float) -> float | None:
        """``name``'s share of the 2xx answers between ``start`` and ``end`` seconds."""
        counts: Counter[str] = Counter()
        for bucket, c in self.buckets.items():
            if start <= bucket * BUCKET_S < end:
                counts.update(
                    {k: n for k, n in c.items() if not k.startswith(("error:", "status:"))}
                )
        total = sum(counts.values())
        return counts[name] / total if total else None

    def error_window(self) -> tuple[float, float] | None:
        """The first and last second with a client-visible error."""
        seconds = [
            b * BUCKET_S
            for b, c in self.buckets.items()
            if any(k.startswith(("error:", "status:")) for k in c)
        ]
        return (min(seconds), max(seconds) + BUCKET_S) if seconds else None


@dataclass(frozen=True)
class Settings:
    duration: float
    kill_at: float
    restart_at: float
    connections: int
    timeout: float
    repeat: int
    targets: list[str]
    output: Path
    workdir: Path = Path()  # scratch directory of this run, set in main


def measure(target: FailoverTarget, settings: Settings) -> FailoverResult:
    result = FailoverResult(target)
    workdir = settings.workdir
    ports = {name: free_port() for name in UPSTREAMS}
    logs = {name: workdir / f"{name}-{ports[name]}.log" for name in UPSTREAMS}
    client: LoadClient | None = None
    port: int | None = None
    try:
        # The proxy stops before the upstreams (the restarted one too), and the client closes
        # before the proxy: the teardown adds nothing to the proxy's log about the victim.
        with ExitStack() as upstreams:
            procs: dict[str, harness.Process] = {}
            for name in UPSTREAMS:
                argv = upstream_command(ports[name], workdir, name, name)
                procs[name] = upstreams.enter_context(running(argv, logs[name]))
            for name in UPSTREAMS:
                url = f"http://127.0.0.1:{ports[name]}/"
                wait_for_get(procs[name], url, logs[name], name.encode())
            port = free_port()
            log = workdir / f"{target.key}-{port}.log"
            argv = target.command(port, list(ports.values()), workdir)
            with running(argv, log) as proxy:
                wait_for_get(proxy, f"http://127.0.0.1:{port}/", log)
                client = LoadClient(port, settings.connections, settings.timeout)
                try:
                    run_scenario(client, proxy, upstreams, procs, ports, logs, result, settings)
                finally:
                    client.close()
                if proxy.poll() is not None:
                    raise BenchError(f"the proxy exited during the run:\n{log_tail(log)}")
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise BenchError(f"{name} exited during the run:\n{log_tail(logs[name])}")
    except (BenchError, OSError) as exc:
        result.error = str(exc)
    finally:
        if port is not None:
            result.log_lines = victim_lines(workdir, target, port, ports[VICTIM])
        if client is not None:
            result.buckets = client.buckets
            result.max_latency = client.max_latency
            result.latencies = client.latencies
            result.returned_after = client.first_after.get(VICTIM)
    return result


def run_scenario(
    client: LoadClient,
    proxy: harness.Process,
    upstreams: ExitStack,
    procs: dict[str, harness.Process],
    ports: dict[str, int],
    logs: dict[str, Path],
    result: FailoverResult,
    settings: Settings,
) -> None:
    """Warm up, then load for ``settings.duration`` seconds, killing the victim and starting it
    again (into ``upstreams``, so it stops with the others) on time, and sampling the proxy's CPU
    time every second."""

    def sample() -> None:
        cpu = proxy.cpu_times().total
        result.cpu_samples.append((time.monotonic() - client.t0, cpu))

    def kill() -> None:
        victim = procs[VICTIM]
        victim.send(signal.SIGKILL)
        victim.wait()
        result.killed_at = time.monotonic() - client.t0

    def restart() -> None:
        argv = upstream_command(ports[VICTIM], settings.workdir, VICTIM, VICTIM)
        procs[VICTIM] = upstreams.enter_context(running(argv, logs[VICTIM]))
        result.restarted_at = time.monotonic() - client.t0
        client.watch_from[VICTIM] = result.restarted_at

    client.run(WARMUP_S, [])
    client.reset()
    result.started = time.time()
    samples = [(float(second), sample) for second in range(int(settings.duration))]
    client.run(
        settings.duration, [(settings.kill_at, kill), (settings.restart_at, restart), *samples]
    )
    sample()
    result.seconds = time.monotonic() - client.t0


def victim_lines(workdir: Path, target: FailoverTarget, port: int, victim: int) -> list[str]:
    """The proxy's log lines (its output, and nginx's error log) that name the victim's port."""
    lines = []
    logs = [workdir / f"{target.key}-{port}.log"]
    if target.error_log is not None:
        logs.append(workdir / target.error_log)
    for log in logs:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        # nginx's lines end in ", client: ..., upstream: ..., host: ...": the port is known.
        lines += [line.split(", client: ")[0] for line in text.splitlines() if f":{victim}" in line]
    return lines


def seconds_text(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def describe(result: FailoverResult) -> str:
    if result.requests == 0:
        return f"FAILED: {result.error}"
    rate = result.requests / result.seconds if result.seconds else 0.0
    text = (
        f"{result.requests:,} requests ({rate:,.0f}/s), {result.client_errors} client errors "
        f"({result.non_2xx} non-2xx, {result.socket_errors} socket errors, {result.timeouts} "
        f"timeouts); {VICTIM} answered {seconds_text(result.returned_after)} after its restart"
    )
    if result.error is not None:
        text += f"\n  FAILED: {result.error}"
    return text


@dataclass
class FailoverRounds:
    target: FailoverTarget
    results: list[FailoverResult] = dataclasses.field(default_factory=list)


def run_rounds(settings: Settings) -> dict[str, FailoverRounds]:
    results = {t.key: FailoverRounds(t) for t in TARGETS if t.key in settings.targets}
    return in_rounds(results, settings.repeat, lambda t: measure(t, settings), describe)


# --- report ----------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.1f} ms"


def share_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def result_row(label: str, result: FailoverResult, settings: Settings) -> str:
    if result.requests == 0:
        return f"| {label} | failed (see below) | | | | | | | | |"
    rate = result.requests / result.seconds if result.seconds else 0.0
    window = result.error_window()
    errors_when = "-" if window is None else f"{window[0]:.1f}-{window[1]:.1f} s"
    end = settings.duration
    last_share = result.share(VICTIM, max(settings.restart_at, end - SHARE_WINDOW_S), end)
    return (
        f"| {label} | {result.requests:,} | {rate:,.0f} | **{result.client_errors}** "
        f"| {result.non_2xx} / {result.socket_errors} / {result.timeouts} | {errors_when} "
        f"| {seconds_text(result.returned_after)} | {share_text(last_share)} "
        f"| {ms(percentile(result.latencies, 99))} "
        f"| {ms(max(result.latencies) if result.latencies else None)} |"
    )


def result_table(results: dict[str, FailoverRounds], settings: Settings) -> list[str]:
    rows = [
        f"| Proxy | requests | req/s | client errors | non-2xx / socket / timeout | errors "
        f"between | {VICTIM} back after restart | {VICTIM} share, last {SHARE_WINDOW_S:.0f} s "
        "| p99 | max latency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rounds in results.values():
        for number, result in enumerate(rounds.results, 1):
            label = rounds.target.label
            if settings.repeat > 1:
                label += f", round {number}"
            rows.append(result_row(label, result, settings))
    return rows


def second_cells(result: FailoverResult, second: int) -> str:
    counts: Counter[str] = Counter()
    for bucket in range(round(second / BUCKET_S), round((second + 1) / BUCKET_S)):
        counts.update(result.buckets.get(bucket, Counter()))
    answered = sum(counts[name] for name in UPSTREAMS)
    shares = " / ".join(f"{counts[name] / answered:.0%}" if answered else "-" for name in UPSTREAMS)
    errors = sum(n for k, n in counts.items() if k.startswith(("error:", "status:")))
    worst = max(
        (
            result.max_latency.get(b, 0.0)
            for b in range(round(second / BUCKET_S), round((second + 1) / BUCKET_S))
        ),
        default=0.0,
    )
    use = result.cpu_use(second)
    cpu = "n/a" if use is None else f"{use:.0%}"
    return f"{sum(counts.values()):,} | {shares} | {errors} | {worst * 1000:.0f} ms | {cpu}"


def timeline(results: dict[str, FailoverRounds], settings: Settings) -> list[str]:
    """Per second: each proxy's requests, each upstream's share of the 2xx, errors, worst
    latency and the proxy's CPU use; the first round of each proxy."""
    firsts = [(r.target.label, r.results[0]) for r in results.values() if r.results]
    firsts = [(label, result) for label, result in firsts if result.requests]
    if not firsts:
        return ["No timeline: nothing was measured."]
    names = " / ".join(UPSTREAMS)
    head = "| s | event |" + "".join(
        f" {label}: requests | {names} | errors | max latency | proxy CPU |" for label, _ in firsts
    )
    rows = [head, "|---:|---|" + "---:|---:|---:|---:|---:|" * len(firsts)]
    for second in range(int(settings.duration + 0.999)):
        events = []
        if int(settings.kill_at) == second:
            events.append(f"kill -9 {VICTIM}")
        if int(settings.restart_at) == second:
            events.append(f"restart {VICTIM}")
        cells = "".join(f" {second_cells(result, second)} |" for _, result in firsts)
        rows.append(f"| {second}-{second + 1} | {', '.join(events)} |{cells}")
    return rows


def target_lines(results: dict[str, FailoverRounds]) -> list[str]:
    lines = []
    for rounds in results.values():
        done = [r for r in rounds.results if r.requests]
        label = rounds.target.label
        if rounds.target.key.startswith("webtorch"):
            errors = sum(r.client_errors for r in done)
            ok = None if not done else errors == 0
            lines.append(
                f"- {label}: zero client-visible errors for GETs: {verdict(ok)} "
                f"({errors} in {sum(r.requests for r in done):,} requests)"
            )
        back = [r.returned_after for r in done]
        shown = ", ".join(seconds_text(b) for b in back) or "n/a"
        returned = [b for b in back if b is not None]
        median = f" (median {statistics.median(returned):.2f} s)" if len(returned) > 1 else ""
        lines.append(f"- {label}: {VICTIM} answered again {shown} after its restart{median}")
    return lines


# What the configurations imply; the numbers above are each run's own.
READING = [
    "- nginx has no active checks: `max_fails=1` takes a server out at its first failure for "
    "`fail_timeout` (10 s), after which live requests try it again (a failure there is retried "
    "on another server and restarts the 10 s). A server restarted within that window is back "
    "about 10 s after the kill; one restarted later, up to 10 s after its restart.",
    "- WebTorch holds a server out on passive health (`max_fails = 1`, `fail_timeout = 10`), "
    "on outlier ejection (on by default: 5 consecutive gateway failures eject it for "
    "`base_ejection_time = 30` s, longer for repeat offenders) and on its active check (every "
    "1 s, `fails = 1`, `passes = 1`). How soon a restarted server is back depends on which of "
    "these states a passing active check clears: the row with outlier ejection off isolates "
    "that, and the log lines below name the states each proxy went through.",
]

LOG_HEAD, LOG_TAIL = 6, 4  # log lines shown from the start and the end


def log_section(results: dict[str, FailoverRounds]) -> list[str]:
    """What each proxy logged about the victim in its first round, to explain the timeline."""
    lines = []
    for rounds in results.values():
        if not rounds.results:
            continue
        result = rounds.results[0]
        found = result.log_lines
        shown = (
            found
            if len(found) <= LOG_HEAD + LOG_TAIL
            else [
                *found[:LOG_HEAD],
                f"... {len(found) - LOG_HEAD - LOG_TAIL} more ...",
                *found[-LOG_TAIL:],
            ]
        )
        start = dt.datetime.fromtimestamp(result.started).strftime("%H:%M:%S.%f")[:-3]
        lines += [
            f"{rounds.target.label}: {len(found)} line(s) naming {VICTIM}'s port. The load began "
            f"at {start} (local time); {VICTIM} was killed {plus_seconds(result.killed_at)} and "
            f"restarted {plus_seconds(result.restarted_at)} into it:",
            "",
            "```",
            *(shown or ["(none)"]),
            "```",
            "",
        ]
    return lines


def plus_seconds(value: float | None) -> str:
    return "(not done)" if value is None else f"{value:.2f} s"


def method_line(settings: Settings) -> str:
    return (
        f"- Method: three upstreams up1-up3, each an nginx `return 200` in one process "
        f"(`master_process off`) naming itself in `X-Upstream`, on CPU {CLIENT_CPU} with the "
        f"client; the proxy alone on CPU {SERVER_CPU}, configured as in the proxy section "
        "(nginx: `max_fails=1 fail_timeout=10s`, `proxy_next_upstream error timeout`, 3 tries, "
        "keepalive 32, 1 s connect / 5 s read timeouts; WebTorch: the same plus an active "
        "health check of /health every 1 s, `fails = 1`, `passes = 1`, and its default outlier "
        "ejection (5 consecutive gateway failures eject for 30 s) on or off). The client is this "
        f"script on CPU {CLIENT_CPU}: {settings.connections} keep-alive connections, each with "
        "one GET / in flight (closed loop), every request's outcome counted: a 2xx by the "
        "upstream that served it, a non-2xx, a socket error (reset, closed or failed connect "
        f"with the request in flight) or a timeout (no answer in {settings.timeout:g} s). After "
        f"a {WARMUP_S:g} s warm-up: {settings.duration:g} s of load, `kill -9` of {VICTIM} at "
        f"{settings.kill_at:g} s, {VICTIM} started again on the same port at "
        f'{settings.restart_at:g} s. "Back after restart" is the time from starting it to its '
        "first answer through the proxy. The client's rate on its shared CPU jumps between two "
        "regimes about 2x apart (seen here with either proxy, and without any kill), so read "
        "the requests per second with the proxy CPU column: when both fall together, the client "
        "slowed down, not the proxy."
    )


def render(
    results: dict[str, FailoverRounds], settings: Settings, load_before: str, nproc: int
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        MARK_START,
        f"## Failover under load: {now}",
        "",
        f"- Command: `{command_line()}`",
        f"- Machine: {os.cpu_count()} CPUs (`nproc`: {nproc}), "
        f"{cpu_model()}, Linux {platform.release()}; load average before the run: {load_before}",
        f"- Software: Python {platform.python_version()}, {versions()}; "
        f"{tool_version([find_tool('nginx'), '-v'])}",
        method_line(settings),
        "",
        *result_table(results, settings),
        "",
        "### Targets",
        "",
        *target_lines(results),
        "",
        "### Timeline (first round): requests per second and each upstream's share of the 2xx",
        "",
        *timeline(results, settings),
        "",
        "### Reading",
        "",
        *READING,
        "",
        f"### What the proxies logged about {VICTIM} (first round)",
        "",
        *log_section(results),
        *failure_lines(results),
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of load (45)")
    parser.add_argument("--kill-at", type=float, default=8.0, help=f"kill -9 {VICTIM} at (8)")
    parser.add_argument(
        "--restart-at", type=float, default=14.0, help=f"start {VICTIM} again at (14)"
    )
    parser.add_argument("--connections", type=int, default=64, help="client connections (64)")
    parser.add_argument(
        "--timeout", type=float, default=2.0, help="seconds a request may take (2, as wrk's)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the targets (1)")
    parser.add_argument(
        "--targets", default=",".join(TARGET_KEYS), help=f"comma-separated subset of {TARGET_KEYS}"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGET_KEYS))
    if unknown or not targets:
        parser.error(f"--targets: unknown {unknown}; choose from {TARGET_KEYS}")
    if not 0 < args.kill_at < args.restart_at < args.duration:
        parser.error("needs 0 < --kill-at < --restart-at < --duration")
    if args.connections < 1 or args.repeat < 1 or args.timeout <= 0:
        parser.error("--connections and --repeat must be at least 1, --timeout above 0")
    return Settings(
        duration=args.duration,
        kill_at=args.kill_at,
        restart_at=args.restart_at,
        connections=args.connections,
        timeout=args.timeout,
        repeat=args.repeat,
        targets=targets,
        output=args.output,
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    check_proxy_environment(("nginx", "taskset"), settings.targets)
    terminate_on_sigterm()
    load_before = Path("/proc/loadavg").read_text().split(" ")[0]
    nproc = len(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {int(CLIENT_CPU)})  # the client shares CPU 1 with the upstreams
    with tempfile.TemporaryDirectory(prefix="webtorch-failover-") as tmp:
        results = run_rounds(dataclasses.replace(settings, workdir=Path(tmp)))
    replace_section(
        settings.output, render(results, settings, load_before, nproc), MARK_START, MARK_END
    )
    print(f"wrote {settings.output}")
    for line in target_lines(results):
        print(line)
    failed = any(r.error is not None for rounds in results.values() for r in rounds.results)
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
