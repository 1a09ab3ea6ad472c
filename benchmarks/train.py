"""Online training over HTTP: WebTorch's train endpoint against nginx and a naive FastAPI trainer.

    .venv/bin/python benchmarks/train.py [--duration S] [--warmup S] [--repeat N]
        [--targets KEYS] [--seeds N] [--convergence-timeout S] [--only throughput|convergence]
        [--output FILE]

Throughput: every target runs pinned to CPU 0 with ``taskset -c 1 wrk -t1 -c64`` on CPU 1, all in
this one run and ``--repeat`` times in rounds, as ``benchmarks/run.py`` does (its helpers are
imported from there). Each request trains on ONE XOR example, ``{"inputs": [[0, 1]], "targets":
[[1]]}``, the Lua script rotating over the four examples. The targets: nginx ``return 200`` with a
JSON body of a train answer's size (the ceiling); ``webtorch serve`` with ``[models.xor.train]
durability = "none"``, ``"checkpoint"`` and ``"wal"`` (micro-batches of up to 64 rows per
optimizer step), and ``"wal"`` with ``max_batch = 1`` (one optimizer step per request, as the
original WebTorch did); FastAPI's naive trainer (``benchmarks/fastapi_train.py``: a ``def`` handler
in the thread pool, no lock), and the same with an ``async def`` handler. For WebTorch and FastAPI
the optimizer steps taken during the measured window come from the ``step`` of a train request
sent just before and just after it, so the mean micro-batch is wrk's requests over those steps.
The script checks every server is still alive after the load and counts the naive trainer's 5xx
answers.

Convergence: how many training examples XOR needs before all four rounded predictions are right
and the mean BCE over the four is below 0.05, with micro-batching (64 concurrent clients,
``max_batch = 64``) and with one optimizer step per request (``max_batch = 1``). Each run starts
``webtorch serve`` (durability ``none``) on a copy of ``xor.py`` in a scratch directory, without
trained weights beside it and with ``torch.manual_seed(seed)`` before the network is built, so both
modes start from the same random initialisation for a seed. A one-thread client (raw keep-alive
sockets on CPU 1) keeps 64 train requests of random XOR examples in flight and every 64 answered
examples asks ``/models/xor/predict`` for the four inputs (so counts are to within 64).

The results replace the section between the train markers in BENCHMARKS.md (appended at the end
when missing); the rest of the file is left alone. Install the tools with ``benchmarks/setup``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import http.client
import json
import math
import os
import platform
import random
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# benchmarks/ is sys.path[0] when this file runs as a script, so run.py imports as `run`.
from run import (
    BENCH_DIR,
    CLIENT_CPU,
    CONNECTIONS,
    ROOT,
    SERVER_CPU,
    XOR_FILE,
    BenchError,
    WrkResult,
    command_line,
    cpu_model,
    find_tool,
    free_port,
    in_rounds,
    log_tail,
    nginx_conf,
    package_versions,
    parse_wrk,
    per_round,
    post,
    ratio,
    replace_section,
    run_wrk,
    running,
    terminate_on_sigterm,
    tool_version,
    venv_bin,
    wait_until_answering,
)
from run import NGINX_BODY as PREDICT_NGINX_BODY

import webtorch_harness as harness

MARK_START = "<!-- train:start -->"
MARK_END = "<!-- train:end -->"

TRAIN_PATH = "/models/xor/train"
PREDICT_PATH = "/models/xor/predict"
FASTAPI_PATH = "/train"
XOR_EXAMPLES = (([0, 0], [0]), ([0, 1], [1]), ([1, 0], [1]), ([1, 1], [0]))
BODIES = [json.dumps({"inputs": [x], "targets": [y]}) for x, y in XOR_EXAMPLES]
# What nginx returns: the size and shape of a train answer, so it is the same work for wrk.
NGINX_BODY = '{"loss":0.6931471824645996,"step":123456}'
PREDICT_MAX_BATCH = 256
TRAIN_MAX_BATCH = 64
CHECKPOINT_EVERY_STEPS = 1000
CHECKPOINT_EVERY_SECONDS = 60
ORIGINAL_RPS = 1000  # the original WebTorch's figure, from the issue: a 2-core laptop

# Convergence
CONVERGED_BCE = 0.05
CHECK_EVERY = 64  # answered examples between two predict checks
CONVERGENCE_CLIENTS = 64


# --- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainTarget:
    key: str
    label: str
    path: str
    # (port, scratch directory) -> the server's argv, before taskset
    command: Callable[[int, Path], list[str]]
    kind: str  # "nginx", "webtorch" or "fastapi": what its answers and state hold
    # The naive trainer is warmed up with one connection, which it serves correctly, so that
    # whatever the concurrency does to it happens in the measured window.
    warmup_connections: int = CONNECTIONS
    count_5xx: bool = False  # count 5xx answers in wrk's Lua (costly at nginx's rates)
    durability: str | None = None
    train_max_batch: int | None = None


def nginx_train_command(port: int, workdir: Path) -> list[str]:
    conf = workdir / "nginx-train.conf"
    text = nginx_conf(port, workdir)
    old = PREDICT_NGINX_BODY.replace("'", "\\'")
    if text.count(old) != 1:
        raise BenchError("run.nginx_conf no longer holds run.NGINX_BODY once")
    conf.write_text(text.replace(old, NGINX_BODY))
    return [
        find_tool("nginx"),
        "-e",
        str(workdir / "nginx-error.log"),
        "-p",
        str(workdir),
        "-c",
        str(conf),
    ]


def webtorch_config(
    port: int,
    model_file: Path,
    state_dir: Path,
    durability: str,
    train_max_batch: int,
    compute: str = "loop",
) -> str:
    return (
        "[server]\n"
        f'listen = "127.0.0.1:{port}"\n'
        "\n"
        "[models.xor]\n"
        f"path = {json.dumps(str(model_file))}\n"
        f"max_batch = {PREDICT_MAX_BATCH}\n"
        f'compute = "{compute}"\n'
        "\n"
        "[models.xor.train]\n"
        "enabled = true\n"
        f"max_batch = {train_max_batch}\n"
        f'durability = "{durability}"\n'
        f"state_dir = {json.dumps(str(state_dir))}\n"
        f"checkpoint_every_steps = {CHECKPOINT_EVERY_STEPS}\n"
        f"checkpoint_every_seconds = {CHECKPOINT_EVERY_SECONDS}\n"
    )


def state_dir_of(workdir: Path, port: int) -> Path:
    return workdir / f"state-{port}"


def webtorch_train_command(
    durability: str, max_batch: int, compute: str = "loop"
) -> Callable[[int, Path], list[str]]:
    def command(port: int, workdir: Path) -> list[str]:
        state = state_dir_of(workdir, port)
        shutil.rmtree(state, ignore_errors=True)
        config = workdir / f"train-{durability}-{max_batch}-{compute}-{port}.toml"
        config.write_text(webtorch_config(port, XOR_FILE, state, durability, max_batch, compute))
        return [venv_bin("webtorch"), "serve", str(config)]

    return command


def fastapi_train_command(handler: str) -> Callable[[int, Path], list[str]]:
    def command(port: int, workdir: Path) -> list[str]:
        # faulthandler only prints where a fatal signal struck; it changes nothing else.
        script = str(BENCH_DIR / "fastapi_train.py")
        argv = [sys.executable, "-X", "faulthandler", script, "--port", str(port)]
        return [*argv, "--handler", handler]

    return command


def webtorch_target(
    key: str, durability: str, max_batch: int, label: str, compute: str = "loop"
) -> TrainTarget:
    command = webtorch_train_command(durability, max_batch, compute)
    return TrainTarget(
        key,
        label,
        TRAIN_PATH,
        command,
        "webtorch",
        durability=durability,
        train_max_batch=max_batch,
    )


TARGETS = [
    TrainTarget("nginx", "nginx `return 200`", TRAIN_PATH, nginx_train_command, "nginx"),
    webtorch_target("webtorch-none", "none", TRAIN_MAX_BATCH, 'WebTorch, `durability = "none"`'),
    webtorch_target(
        "webtorch-checkpoint",
        "checkpoint",
        TRAIN_MAX_BATCH,
        'WebTorch, `durability = "checkpoint"`',
    ),
    webtorch_target("webtorch-wal", "wal", TRAIN_MAX_BATCH, 'WebTorch, `durability = "wal"`'),
    webtorch_target(
        "webtorch-wal-mb1", "wal", 1, 'WebTorch, `durability = "wal"`, `max_batch = 1`'
    ),
    # Where steps run: the model's `compute` setting, measured rather than assumed.
    webtorch_target(
        "webtorch-checkpoint-thread",
        "checkpoint",
        TRAIN_MAX_BATCH,
        'WebTorch, `durability = "checkpoint"`, `compute = "thread"`',
        "thread",
    ),
    webtorch_target(
        "webtorch-wal-thread",
        "wal",
        TRAIN_MAX_BATCH,
        'WebTorch, `durability = "wal"`, `compute = "thread"`',
        "thread",
    ),
    TrainTarget(
        "fastapi",
        "FastAPI naive trainer (`def` handler, thread pool, no lock)",
        FASTAPI_PATH,
        fastapi_train_command("def"),
        "fastapi",
        warmup_connections=1,
        count_5xx=True,
    ),
    TrainTarget(
        "fastapi-async",
        "FastAPI trainer, `async def` handler (one request at a time on the loop)",
        FASTAPI_PATH,
        fastapi_train_command("async"),
        "fastapi",
        count_5xx=True,
    ),
]
TARGET_KEYS = [t.key for t in TARGETS]


# --- one throughput measurement --------------------------------------------------------------


@dataclass
class TrainResult:
    target: TrainTarget
    load: WrkResult | None = None
    status_5xx: int | None = None  # counted by wrk's Lua, where the target asks for it
    steps: int | None = None  # optimizer steps during the measured window
    last_step: int | None = None  # the server's step counter after the load
    last_loss: float | None = None
    died: str | None = None  # how and when the server died during the load
    shutdown: str | None = None  # how the server left on SIGTERM
    state: str | None = None  # what a WebTorch server left in its state directory
    log_errors: Counter[str] = dataclasses.field(default_factory=Counter)
    error: str | None = None

    @property
    def micro_batch(self) -> float | None:
        if self.load is None or not self.steps:
            return None
        return self.load.requests / self.steps


@dataclass(frozen=True)
class Settings:
    duration: int
    warmup: int
    targets: list[str]
    output: Path
    repeat: int
    seeds: int
    convergence_timeout: float
    throughput: bool
    convergence: bool
    workdir: Path = Path()  # scratch directory of this run, set in main


def write_train_lua(workdir: Path, target: TrainTarget) -> Path:
    """A wrk script that rotates over the four XOR train bodies, requests formatted once."""
    # A JSON string literal is also a valid Lua string literal for these ASCII bodies.
    bodies = "\n".join(f"  {json.dumps(body)}," for body in BODIES)
    script = f"""\
local bodies = {{
{bodies}
}}
local requests = {{}}
local n = 0
local threads = {{}}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  status5xx = 0
  for i, body in ipairs(bodies) do
    requests[i] = wrk.format("POST", nil, {{["Content-Type"] = "application/json"}}, body)
  end
end

function request()
  n = n % #requests + 1
  return requests[n]
end
"""
    if target.count_5xx:
        script += """
function response(status, headers, body)
  if status >= 500 then
    status5xx = status5xx + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("status5xx")
  end
  io.write(string.format("5xx responses: %d\\n", total))
end
"""
    path = workdir / f"train-{target.key}.lua"
    path.write_text(script)
    return path


def train_answer(answer: bytes) -> tuple[float, int]:
    """(loss, step) from a train answer: a finite loss and a positive step."""
    try:
        data = json.loads(answer)
        loss, step = float(data["loss"]), int(data["step"])
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"not a train answer: {answer[:200]!r}") from None
    if not math.isfinite(loss) or step < 1:
        raise BenchError(f"train answer with a bad loss or step: {answer[:200]!r}")
    return loss, step


def exit_text(returncode: int) -> str:
    if returncode == 0:
        return "exited with status 0"
    if returncode < 0:
        with_name = signal.Signals(-returncode).name
        return f"killed by {with_name}"
    return f"exited with status {returncode}"


def run_wrk_watching(
    proc: harness.Process, url: str, lua: Path, duration: int
) -> tuple[WrkResult, str, float | None]:
    """wrk at 64 connections while watching the server: (result, wrk's output, seconds into the
    load when the server died or None)."""
    argv = [
        "taskset", "-c", CLIENT_CPU, find_tool("wrk"), "-t1", f"-c{CONNECTIONS}",
        f"-d{duration}s", "--latency", "-s", str(lua), url,
    ]  # fmt: skip
    start = time.monotonic()
    died_at = None
    wrk = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            try:
                out, err = wrk.communicate(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                if died_at is None and proc.poll() is not None:
                    died_at = time.monotonic() - start
                if time.monotonic() - start > duration + 30:
                    raise BenchError(f"wrk did not finish within {duration + 30}s") from None
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    if died_at is None and proc.poll() is not None:
        died_at = time.monotonic() - start
    if wrk.returncode != 0:
        raise BenchError(f"wrk failed ({wrk.returncode}): {err.strip() or out}")
    return parse_wrk(out), out, died_at


# An exception's type and message, the message cut before a tensor's description ": [torch...".
ERROR_LINE = re.compile(
    r"^((?:\w+\.)*\w*(?:Error|Exception)): (.{0,120}?)(?:: \[|\.? *$)", re.MULTILINE
)
FATAL_LINE = re.compile(r"^Fatal Python error: (.*)$", re.MULTILINE)
CRASH_FRAME = re.compile(
    r"^Current thread [^\n]*\n\s+File \"([^\"]+)\", line (\d+) in (\w+)", re.MULTILINE
)


def log_errors(log: Path) -> Counter[str]:
    """Exceptions and fatal errors in a server's log, by type and message (first 100 chars)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return Counter()
    found: Counter[str] = Counter(f"{m[0]}: {m[1]}" for m in ERROR_LINE.findall(text))
    for fatal in FATAL_LINE.findall(text):
        where = CRASH_FRAME.search(text)
        place = f" in {where[3]} ({Path(where[1]).name}:{where[2]})" if where else ""
        found[f"Fatal Python error: {fatal}{place}"] += 1
    return found


def state_summary(state: Path) -> str:
    if not state.is_dir():
        return "no state directory"
    files = [p for p in state.rglob("*") if p.is_file()]
    if not files:
        return "state directory empty"
    size = sum(p.stat().st_size for p in files)
    names = sorted({re.sub(r"\d+", "N", p.name) for p in files})
    return (
        f"{len(files)} file(s), {size / 1024:.0f} KiB in the state directory ({', '.join(names)})"
    )


def load_once(
    proc: harness.Process,
    target: TrainTarget,
    url: str,
    lua: Path,
    log: Path,
    settings: Settings,
    result: TrainResult,
) -> None:
    """Warm up, then measure at 64 connections, reading the step counter before and after."""
    trains = target.kind != "nginx"
    first = wait_until_answering(proc, url, BODIES[1], log)
    if trains:
        train_answer(first)
    run_wrk(url, lua, target.warmup_connections, settings.warmup)
    step_before = train_answer(post(url, BODIES[2]))[1] if trains else 0
    result.load, out, died_at = run_wrk_watching(proc, url, lua, settings.duration)
    if target.count_5xx:
        match = re.search(r"^5xx responses: (\d+)", out, re.MULTILINE)
        result.status_5xx = int(match.group(1)) if match else None
    if died_at is not None:
        assert proc.returncode is not None
        result.died = f"{exit_text(proc.returncode)} {died_at:.1f}s into the load"
    elif trains:
        loss, step = train_answer(post(url, BODIES[3]))
        result.steps = step - step_before - 1
        result.last_step, result.last_loss = step, loss


def measure(target: TrainTarget, settings: Settings) -> TrainResult:
    result = TrainResult(target)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = base + target.path
    log = settings.workdir / f"{target.key}-{port}.log"
    lua = write_train_lua(settings.workdir, target)
    proc: harness.Process | None = None
    try:
        with running(target.command(port, settings.workdir), log) as proc:
            try:
                load_once(proc, target, url, lua, log, settings, result)
            except (BenchError, OSError) as exc:
                result.error = str(exc)
                if (status := proc.poll()) is not None and result.died is None:
                    result.died = exit_text(status)
    except (BenchError, OSError) as exc:  # the server could not be started
        result.error = str(exc)
    if proc is not None and result.died is None and proc.returncode is not None:
        ended = exit_text(proc.returncode)
        if proc.returncode == -signal.SIGTERM:  # uvicorn re-raises the signal after its shutdown
            ended = "ended by the signal"
        result.shutdown = f"on SIGTERM: {ended}"
        if target.kind == "webtorch":
            result.state = state_summary(state_dir_of(settings.workdir, port))
    result.log_errors = log_errors(log)
    if result.error is not None and log.exists():
        result.error += f"\n--- server log (tail) ---\n{log_tail(log, 25)}"
    return result


def describe(result: TrainResult) -> str:
    if result.load is None:
        return f"FAILED: {result.error}"
    load = result.load
    text = (
        f"{load.rps:,.0f} req/s, p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms, "
        f"{load.requests} requests, {load.non_2xx} non-2xx, {load.socket_errors} socket errors"
    )
    if result.status_5xx is not None:
        text += f", {result.status_5xx} 5xx"
    if result.steps is not None:
        text += f"; {result.steps} optimizer steps (step {result.last_step} after)"
        if result.micro_batch is not None:
            text += f", mean micro-batch {result.micro_batch:.1f}"
    if result.died:
        text += f"; SERVER DIED: {result.died}"
    if result.shutdown:
        text += f"; {result.shutdown}"
    if result.state:
        text += f"; {result.state}"
    for line, count in result.log_errors.most_common(3):
        text += f"\n    log: {count}x {line}"
    if result.error is not None:
        text += f"\n  FAILED: {result.error}"
    return text


@dataclass
class TrainRounds:
    target: TrainTarget
    results: list[TrainResult] = dataclasses.field(default_factory=list)

    @property
    def rps(self) -> list[float | None]:
        """Each round's req/s; None for a round that failed or whose server died."""
        return [r.load.rps if r.load is not None and r.died is None else None for r in self.results]

    @property
    def median_rps(self) -> float | None:
        done = [rps for rps in self.rps if rps is not None]
        return statistics.median(done) if done else None

    @property
    def median_round(self) -> TrainResult | None:
        done = [(r.load.rps, i) for i, r in enumerate(self.results) if r.load and not r.died]
        if not done:
            return None
        done.sort()
        return self.results[done[(len(done) - 1) // 2][1]]


def run_rounds(settings: Settings) -> dict[str, TrainRounds]:
    results = {t.key: TrainRounds(t) for t in TARGETS if t.key in settings.targets}
    return in_rounds(results, settings.repeat, lambda t: measure(t, settings), describe)


# --- convergence -----------------------------------------------------------------------------


SEEDED_TAIL = """

# Appended by benchmarks/train.py: a seeded initialisation, so every run with this seed starts
# from the same random weights (and there is no xor.safetensors beside this copy).
_unseeded_network = model.network


def _seeded_network() -> torch.nn.Module:
    torch.manual_seed({seed})
    if isinstance(_unseeded_network, torch.nn.Module):
        return _unseeded_network
    return _unseeded_network()


model.network = _seeded_network
"""


@dataclass
class Convergence:
    seed: int
    max_batch: int
    examples: int | None = None  # answered train examples when the check first passed
    steps: int | None = None  # the highest step seen in train answers by then
    seconds: float | None = None  # from the first train request to the passing check
    initial_bce: float | None = None
    final_bce: float | None = None
    sent: int = 0  # answered train examples in all
    errors: int = 0  # train answers other than 200
    error: str | None = None

    @property
    def micro_batch(self) -> float | None:
        return self.examples / self.steps if self.examples and self.steps else None


def predictions(conn: http.client.HTTPConnection) -> list[float]:
    body = json.dumps({"inputs": [x for x, _ in XOR_EXAMPLES]})
    conn.request("POST", PREDICT_PATH, body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = response.read()
    if response.status != 200:
        raise BenchError(f"predict answered {response.status}: {answer[:200]!r}")
    outputs = json.loads(answer)["outputs"]
    return [float(row[0]) for row in outputs]


def bce_and_right(probs: list[float]) -> tuple[float, bool]:
    eps = 1e-7
    total, right = 0.0, True
    for p, (_, (y,)) in zip(probs, XOR_EXAMPLES, strict=True):
        q = min(max(p, eps), 1 - eps)
        total -= y * math.log(q) + (1 - y) * math.log(1 - q)
        right = right and (p > 0.5) == (y == 1)
    return total / len(probs), right


class TrainClients:
    """``CONVERGENCE_CLIENTS`` keep-alive connections, each with one train request in flight,
    driven from one thread with a selector; a connection sends its next random example as soon as
    its answer is in."""

    def __init__(self, port: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.requests = [
            (
                f"POST {TRAIN_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
            for body in BODIES
        ]
        self.selector = selectors.DefaultSelector()
        self.buffers: dict[socket.socket, bytearray] = {}
        self.answered = 0
        self.errors = 0
        self.last_step = 0
        for _ in range(CONVERGENCE_CLIENTS):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffers[sock] = bytearray()
            self.selector.register(sock, selectors.EVENT_READ)

    def start(self) -> None:
        for sock in self.buffers:
            self.send(sock)

    def send(self, sock: socket.socket) -> None:
        sock.sendall(self.requests[self.rng.randrange(4)])

    def pump(self, timeout: float) -> None:
        """Read what has arrived, count whole answers and send the next requests."""
        for key, _ in self.selector.select(timeout):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            data = sock.recv(65536)
            if not data:
                raise BenchError("the server closed a train connection")
            buf = self.buffers[sock]
            buf += data
            while (answer := self.take_answer(buf)) is not None:
                status, body = answer
                self.answered += 1
                if status == 200:
                    self.last_step = max(self.last_step, int(json.loads(body)["step"]))
                else:
                    self.errors += 1
                    if self.errors == 1:
                        print(f"  train answered {status}: {body[:200]!r}", flush=True)
                self.send(sock)

    @staticmethod
    def take_answer(buf: bytearray) -> tuple[int, bytes] | None:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buf[:end]).decode("latin-1")
        match = re.search(r"^content-length:\s*(\d+)", head, re.IGNORECASE | re.MULTILINE)
        if match is None:
            raise BenchError(f"train answer without Content-Length: {head!r}")
        total = end + 4 + int(match.group(1))
        if len(buf) < total:
            return None
        status = int(head.split(" ", 2)[1])
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        return status, body

    def close(self) -> None:
        for sock in self.buffers:
            self.selector.unregister(sock)
            sock.close()
        self.selector.close()


def converge(seed: int, max_batch: int, settings: Settings) -> Convergence:
    """One server from the seeded initialisation; train until converged or timed out."""
    run = Convergence(seed, max_batch)
    scratch = settings.workdir / f"converge-{seed}-{max_batch}"
    scratch.mkdir()
    model_file = scratch / "xor.py"
    model_file.write_text(XOR_FILE.read_text() + SEEDED_TAIL.format(seed=seed))
    port = free_port()
    config = scratch / "xor.toml"
    config.write_text(webtorch_config(port, model_file, scratch / "state", "none", max_batch))
    log = scratch / "server.log"
    predict_body = json.dumps({"inputs": [x for x, _ in XOR_EXAMPLES]})
    clients: TrainClients | None = None
    affinity = os.sched_getaffinity(0)
    try:
        with running([venv_bin("webtorch"), "serve", str(config)], log) as proc:
            wait_until_answering(proc, f"http://127.0.0.1:{port}{PREDICT_PATH}", predict_body, log)
            os.sched_setaffinity(0, {int(CLIENT_CPU)})
            checker = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            run.initial_bce = bce_and_right(predictions(checker))[0]
            clients = TrainClients(port, seed)
            start = time.monotonic()
            deadline = start + settings.convergence_timeout
            next_check = CHECK_EVERY
            clients.start()
            while time.monotonic() < deadline:
                clients.pump(0.5)
                if (status := proc.poll()) is not None:
                    raise BenchError(f"server {exit_text(status)}:\n{log_tail(log)}")
                if clients.answered < next_check:
                    continue
                next_check = clients.answered - clients.answered % CHECK_EVERY + CHECK_EVERY
                bce, right = bce_and_right(predictions(checker))
                run.final_bce = bce
                if right and bce < CONVERGED_BCE:
                    run.seconds = time.monotonic() - start
                    run.examples, run.steps = clients.answered, clients.last_step
                    break
            run.sent, run.errors = clients.answered, clients.errors
            checker.close()
    except (BenchError, OSError, ValueError, KeyError) as exc:
        run.error = f"{type(exc).__name__}: {exc}\n--- server log (tail) ---\n{log_tail(log, 25)}"
    finally:
        os.sched_setaffinity(0, affinity)
        if clients is not None:
            clients.close()
    return run


def describe_convergence(run: Convergence) -> str:
    if run.error is not None:
        return f"FAILED: {run.error}"
    start = f"initial BCE {run.initial_bce:.3f}; "
    if run.examples is None:
        return start + f"NOT converged within {run.sent:,} examples, final BCE {run.final_bce}"
    return start + (
        f"converged after {run.examples:,} examples, {run.steps:,} steps "
        f"(mean micro-batch {run.micro_batch:.1f}), {run.seconds:.1f}s, BCE {run.final_bce:.4f}, "
        f"{run.errors} errors"
    )


def run_convergence(settings: Settings) -> list[Convergence]:
    runs = []
    for seed in range(settings.seeds):
        for max_batch in (TRAIN_MAX_BATCH, 1):
            print(f"convergence: seed {seed}, train max_batch {max_batch} ...", flush=True)
            run = converge(seed, max_batch, settings)
            runs.append(run)
            print(f"  {describe_convergence(run)}", flush=True)
    return runs


# --- report ----------------------------------------------------------------------------------


def rps_of(results: dict[str, TrainRounds], key: str) -> float | None:
    rounds = results.get(key)
    return rounds.median_rps if rounds is not None else None


def ratio_detail(results: dict[str, TrainRounds], key: str) -> str:
    """``0.41x median; rounds 0.38x / 0.43x / 0.41x`` against nginx."""
    value, ref = results.get(key), results.get("nginx")
    if value is None or ref is None:
        return "n/a"
    rounds = " / ".join(ratio(v, r) for v, r in zip(value.rps, ref.rps, strict=True))
    return f"{ratio(value.median_rps, ref.median_rps)} median; rounds {rounds}"


def errors_text(rounds: TrainRounds) -> str:
    loads = [r.load for r in rounds.results if r.load is not None]
    non_2xx = sum(load.non_2xx for load in loads)
    sock = sum(load.socket_errors for load in loads)
    text = f"{non_2xx:,} non-2xx, {sock:,} socket"
    counted = [r.status_5xx for r in rounds.results if r.status_5xx is not None]
    if counted:
        text += f" ({sum(counted):,} 5xx)"
    return text if non_2xx or sock or sum(counted) else "0"


def server_text(rounds: TrainRounds) -> str:
    died = [r.died for r in rounds.results if r.died is not None]
    if died:
        # "killed by SIGSEGV 0.3s into the load" x 3 -> "killed by SIGSEGV 0.3s / 0.6s / 0.1s ..."
        how = {re.sub(r" [\d.]+s into", " into", d) for d in died}
        if len(how) == 1 and all(" into the load" in d for d in died):
            times = " / ".join(re.sub(r".* ([\d.]+s) into the load", r"\1", d) for d in died)
            text = how.pop().replace(" into the load", f" {times} into the load")
        else:
            text = "; ".join(died)
        return f"**died** in {len(died)} of {len(rounds.results)} rounds: {text}"
    failed = sum(r.error is not None for r in rounds.results)
    return f"alive after the load; {failed} round(s) failed" if failed else "alive after the load"


def load_row(rounds: TrainRounds, nginx: float | None) -> str:
    result, rps = rounds.median_round, rounds.median_rps
    per = " / ".join(
        per_round(v) if v is not None or r.died is None else "died"
        for v, r in zip(rounds.rps, rounds.results, strict=True)
    )
    cells = [rounds.target.label]
    if result is None or result.load is None or rps is None:
        answered = [r.load.requests for r in rounds.results if r.load is not None]
        what = f" (answered {' / '.join(f'{n:,}' for n in answered)} requests)" if answered else ""
        cells += [f"n/a{what}", per, "n/a", "", "", "", ""]
    else:
        load = result.load
        cells += [
            f"{rps:,.0f}",
            per,
            ratio(rps, nginx),
            f"{load.p50_ms:.2f} ms",
            f"{load.p99_ms:.2f} ms",
            f"{result.steps:,}" if result.steps is not None else "",
            f"{result.micro_batch:.1f}" if result.micro_batch is not None else "",
        ]
    cells += [errors_text(rounds), server_text(rounds)]
    return "| " + " | ".join(cells) + " |"


def load_table(results: dict[str, TrainRounds]) -> list[str]:
    nginx = rps_of(results, "nginx")
    return [
        "| Target | req/s | req/s per round | x nginx | p50 | p99 | optimizer steps "
        "| mean micro-batch | errors (all rounds) | server |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        *(load_row(rounds, nginx) for rounds in results.values()),
    ]


def verdict(ok: bool | None) -> str:
    return {True: "**pass**", False: "**FAIL**", None: "not measured"}[ok]


def at_least(value: float | None, reference: float | None, factor: float) -> bool | None:
    if value is None or reference is None:
        return None
    return value >= factor * reference


def rps_text(value: float | None) -> str:
    return f"{value:,.0f} req/s" if value is not None else "n/a"


def target_lines(results: dict[str, TrainRounds]) -> list[str]:
    nginx = rps_of(results, "nginx")
    ckpt, wal = rps_of(results, "webtorch-checkpoint"), rps_of(results, "webtorch-wal")
    mb1, none = rps_of(results, "webtorch-wal-mb1"), rps_of(results, "webtorch-none")
    lines = [
        f'- `durability = "checkpoint"` ≥ 0.4x nginx: {verdict(at_least(ckpt, nginx, 0.4))} '
        f"({ratio_detail(results, 'webtorch-checkpoint')})",
        f'- `durability = "wal"` ≥ 0.25x nginx: {verdict(at_least(wal, nginx, 0.25))} '
        f"({ratio_detail(results, 'webtorch-wal')})",
        f"- The original WebTorch: about {ORIGINAL_RPS:,} req/s on a 2-core laptop, one optimizer "
        f"step per request (the issue's figure, another machine). Here, the server on one core: "
        f"`wal` with `max_batch = 1` {rps_text(mb1)} ({ratio(mb1, ORIGINAL_RPS)} of it), "
        f"`wal` {rps_text(wal)} ({ratio(wal, ORIGINAL_RPS)}), `checkpoint` {rps_text(ckpt)} "
        f"({ratio(ckpt, ORIGINAL_RPS)}), `none` {rps_text(none)} ({ratio(none, ORIGINAL_RPS)}).",
    ]
    naive = results.get("fastapi")
    if naive is not None:
        answered = [r.load.requests for r in naive.results if r.load is not None]
        fivexx = [r.status_5xx for r in naive.results if r.status_5xx is not None]
        lines.append(
            f"- FastAPI naive trainer: {server_text(naive)}; answered "
            f"{' / '.join(f'{n:,}' for n in answered) or 'n/a'} requests per round "
            f"({sum(fivexx):,} of them 5xx); errors {errors_text(naive)}."
        )
    return lines


def note_lines(results: dict[str, TrainRounds]) -> list[str]:
    """Per target: how the server left on SIGTERM and what its log complained about."""
    lines = []
    for rounds in results.values():
        if rounds.target.kind == "nginx":
            continue
        shutdowns = Counter(r.shutdown for r in rounds.results if r.shutdown is not None)
        errors: Counter[str] = Counter()
        for r in rounds.results:
            errors.update(r.log_errors)
        parts = [f"{text} ({n} of {len(rounds.results)} rounds)" for text, n in shutdowns.items()]
        states = [r.state for r in rounds.results if r.state is not None]
        if states:
            parts.append(f"after the last round: {states[-1]}")
        parts += [f"log: {n}x `{line}`" for line, n in errors.most_common(4)]
        if parts:
            lines.append(f"- {rounds.target.label}: " + "; ".join(parts))
    return lines


def failure_lines(results: dict[str, TrainRounds], runs: list[Convergence]) -> list[str]:
    lines = []
    for rounds in results.values():
        for number, result in enumerate(rounds.results, 1):
            if result.error is not None:
                label = rounds.target.label
                lines += [f"**{label}** failed in round {number}:", "", "```", result.error, "```"]
                lines.append("")
    for run in runs:
        if run.error is not None:
            name = f"Convergence, seed {run.seed}, `max_batch = {run.max_batch}`"
            lines += [f"**{name}** failed:", "", "```", run.error, "```", ""]
    return lines


def mode_name(max_batch: int) -> str:
    if max_batch == 1:
        return "`max_batch = 1` (a step per request)"
    return f"`max_batch = {max_batch}` (micro-batches)"


def convergence_table(runs: list[Convergence], timeout: float) -> list[str]:
    rows = [
        "| seed | train mode | initial BCE | examples to converge | optimizer steps "
        "| mean micro-batch | wall time | final BCE | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        head = f"| {run.seed} | {mode_name(run.max_batch)} "
        if run.error is not None:
            rows.append(head + "| failed (see below) | | | | | | |")
            continue
        initial = f"{run.initial_bce:.3f}" if run.initial_bce is not None else ""
        final = f"{run.final_bce:.4f}" if run.final_bce is not None else ""
        if run.examples is None:
            rows.append(
                head + f"| {initial} | not within {run.sent:,} ({timeout:.0f}s) | | "
                f"| > {timeout:.0f}s | {final} | {run.errors} |"
            )
            continue
        rows.append(
            head + f"| {initial} | {run.examples:,} | {run.steps:,} | {run.micro_batch:.1f} "
            f"| {run.seconds:.1f}s | {final} | {run.errors} |"
        )
    return rows


def convergence_summary(runs: list[Convergence]) -> list[str]:
    def medians(max_batch: int) -> tuple[float, float, int, int] | None:
        done = [r for r in runs if r.max_batch == max_batch and r.examples is not None]
        if not done:
            return None
        examples = statistics.median(r.examples for r in done if r.examples is not None)
        seconds = statistics.median(r.seconds for r in done if r.seconds is not None)
        total = sum(1 for r in runs if r.max_batch == max_batch)
        return examples, seconds, len(done), total

    lines = []
    found = {mb: medians(mb) for mb in (TRAIN_MAX_BATCH, 1)}
    for mb, got in found.items():
        if got is None:
            lines.append(f"- {mode_name(mb)}: converged in no run")
            continue
        examples, seconds, done, total = got
        lines.append(
            f"- {mode_name(mb)}: converged in {done} of {total} runs; median "
            f"{examples:,.0f} examples, {seconds:.1f}s"
        )
    micro, single = found[TRAIN_MAX_BATCH], found[1]
    if micro is not None and single is not None:
        lines.append(
            f"- Micro-batching needed {micro[0] / single[0]:.1f}x the examples of a step per "
            f"request and {micro[1] / single[1]:.2f}x the wall time (medians)."
        )
    return lines


def method_line(settings: Settings) -> str:
    rounds = "1 round" if settings.repeat == 1 else f"{settings.repeat} rounds"
    return (
        f"- Method: each server alone, pinned with `taskset -c {SERVER_CPU}`; "
        f"`taskset -c {CLIENT_CPU} wrk -t1 -c{CONNECTIONS} -d{settings.duration}s --latency` "
        f"after a {settings.warmup}s warm-up (at 1 connection for the naive FastAPI trainer, so "
        "that what concurrency does to it happens in the measured window), every request one XOR "
        'example (`{"inputs": [[0, 1]], "targets": [[1]]}`, rotating over the four). The '
        f"whole list ran {rounds}; req/s and ratios are medians over the rounds that completed "
        "with the server alive, p50, p99, steps and micro-batch come from the median round, errors "
        "are summed (for a server that died, socket errors are mostly wrk's refused connections "
        "after its death, and 5xx are counted by wrk's Lua). WebTorch: `[models.xor] max_batch = "
        f"{PREDICT_MAX_BATCH}`, `[models.xor.train] max_batch = {TRAIN_MAX_BATCH}` (1 where "
        f"said), `checkpoint_every_steps = {CHECKPOINT_EVERY_STEPS}`, "
        f"`checkpoint_every_seconds = {CHECKPOINT_EVERY_SECONDS}`, a fresh `state_dir` on the "
        "local ext4 disk per server, starting from the trained `xor.safetensors`. Optimizer steps: "
        "the `step` of a train request sent just after the load minus that of one sent just "
        "before (minus one); mean micro-batch = wrk's requests / steps. nginx answers a fixed "
        f"JSON body of a train answer's size (`{NGINX_BODY}`)."
    )


def convergence_method(settings: Settings) -> str:
    return (
        f"- Method: for seeds 0-{settings.seeds - 1} and each train mode, `webtorch serve` "
        f"(durability `none`, pinned to CPU {SERVER_CPU}) on a copy of `xor.py` with no trained "
        "weights beside it and `torch.manual_seed(seed)` before the network is built, so both "
        "modes start from the same weights for a seed (the initial BCE column shows it). A "
        f"one-thread Python client on CPU {CLIENT_CPU} keeps {CONVERGENCE_CLIENTS} keep-alive "
        "connections each with one train request of a random XOR example in flight, and after "
        f"every {CHECK_EVERY} answered examples asks `/models/xor/predict` for the four inputs. "
        f"Converged: all four predictions right when rounded and mean BCE < {CONVERGED_BCE}. "
        f"Examples are the answered train requests at that check (so to within {CHECK_EVERY}); "
        f"steps the highest `step` seen in their answers; wall time from the first train request. "
        f"A run stops unconverged after {settings.convergence_timeout:.0f}s."
    )


def render(
    results: dict[str, TrainRounds],
    runs: list[Convergence],
    settings: Settings,
    load_before: str,
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rounds = "1 round" if settings.repeat == 1 else f"{settings.repeat} rounds"
    lines = [
        MARK_START,
        f"## Online training over HTTP: {now}",
        "",
        f"- Command: `{command_line()}`",
        f"- Machine: {os.cpu_count()} CPUs (`nproc`: {len(os.sched_getaffinity(0))}), "
        f"{cpu_model()}, Linux {platform.release()}; load average before the run: {load_before}",
        f"- Software: Python {platform.python_version()}, {package_versions()}; "
        f"{tool_version([find_tool('nginx'), '-v'])}; {tool_version([find_tool('wrk'), '-v'])}",
        "",
    ]
    if settings.throughput:
        lines += [
            f"### Training throughput, 64 connections (median of {rounds})",
            "",
            method_line(settings),
            "",
            *load_table(results),
            "",
            "### Targets",
            "",
            *target_lines(results),
            "",
            "### Server notes",
            "",
            *(note_lines(results) or ["- nothing to note"]),
            "",
        ]
    if settings.convergence:
        lines += [
            "### Convergence: examples until XOR is learnt",
            "",
            convergence_method(settings),
            "",
            *convergence_table(runs, settings.convergence_timeout),
            "",
            *convergence_summary(runs),
            "",
        ]
    lines += [*failure_lines(results, runs), MARK_END]
    return "\n".join(lines) + "\n"


def update_results_file(path: Path, section: str) -> None:
    replace_section(path, section, MARK_START, MARK_END)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement (8)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up (2)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds over the targets; medians reported (3)"
    )
    parser.add_argument(
        "--targets", default=",".join(TARGET_KEYS), help=f"comma-separated subset of {TARGET_KEYS}"
    )
    parser.add_argument("--seeds", type=int, default=5, help="convergence seeds, 0 to N-1 (5)")
    parser.add_argument(
        "--convergence-timeout",
        type=float,
        default=60.0,
        help="seconds a convergence run may take (60)",
    )
    parser.add_argument(
        "--only", choices=("throughput", "convergence"), help="run one part (default: both)"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGET_KEYS))
    if unknown or not targets:
        parser.error(f"--targets: unknown {unknown}; choose from {TARGET_KEYS}")
    if args.duration < 1 or args.warmup < 1 or args.repeat < 1 or args.seeds < 1:
        parser.error("--duration, --warmup, --repeat and --seeds must be at least 1")
    return Settings(
        duration=args.duration,
        warmup=args.warmup,
        targets=targets,
        output=args.output,
        repeat=args.repeat,
        seeds=args.seeds,
        convergence_timeout=args.convergence_timeout,
        throughput=args.only != "convergence",
        convergence=args.only != "throughput",
    )


def check_environment() -> None:
    for tool in ("wrk", "nginx", "taskset"):
        find_tool(tool)
    venv_bin("webtorch")
    for module in ("fastapi", "uvicorn"):
        try:
            metadata.version(module)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"error: {module} is not installed; run benchmarks/setup") from None
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("error: needs two CPUs (server on CPU 0, clients on CPU 1)")


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    check_environment()
    terminate_on_sigterm()
    load_before = Path("/proc/loadavg").read_text().split(" ")[0]
    results: dict[str, TrainRounds] = {}
    runs: list[Convergence] = []
    with tempfile.TemporaryDirectory(prefix="webtorch-train-") as tmp:
        settings = dataclasses.replace(settings, workdir=Path(tmp))
        if settings.throughput:
            results = run_rounds(settings)
        if settings.convergence:
            runs = run_convergence(settings)
    update_results_file(settings.output, render(results, runs, settings, load_before))
    print(f"wrote {settings.output}")
    for line in [
        *(target_lines(results) if results else []),
        *(convergence_summary(runs) if runs else []),
    ]:
        print(line)
    failed = any(r.error is not None for rounds in results.values() for r in rounds.results)
    return 1 if failed or any(run.error is not None for run in runs) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
