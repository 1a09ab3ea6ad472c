"""``webtorch demo``: teach an untrained XOR network over HTTP, from many clients at once.

The demo is a client like any other. It starts ``webtorch serve`` in a subprocess with the bundled
XOR model at its initial weights and online training on, then ``--clients`` threads, each with one
keep-alive connection, POST single random XOR examples to ``/models/xor/train``. A progress bar
shows requests/s and the loss; twice a second ``/models/xor/predict`` is asked about the four XOR
inputs, and once every answer is within ``TOLERANCE`` of the truth the clients stop and a table of
the four predictions is printed. The server is stopped with SIGTERM whatever happens.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

from tqdm import tqdm

import webtorch_harness as harness
from webtorch_harness import HarnessError, Server

INPUTS = [[0, 0], [0, 1], [1, 0], [1, 1]]
TRUTH = [0, 1, 1, 0]
TOLERANCE = 0.2  # converged: every prediction within this of the truth, not just on its side of 0.5
TICK = 0.25  # seconds between progress bar updates
CHECK_EVERY = 0.5  # seconds between convergence checks
READY_TIMEOUT = 90.0  # importing torch on a busy two-core machine can take most of a minute
STOP_TIMEOUT = 30.0  # seconds the server gets to finish its steps and close its WAL

CONFIG = """\
[server]
listen = "127.0.0.1:0"

[models.xor]
path = {path}
weights = false  # start untrained: the xor.safetensors shipped beside xor.py is already trained

[models.xor.train]
enabled = true
max_batch = 64
durability = "wal"
state_dir = {state_dir}
"""


class DemoError(Exception):
    """Why the demo could not go on; printed as one message."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--clients", type=int, default=32, help="concurrent keep-alive clients (32)")
    add("--max-requests", type=int, default=200_000, help="give up after N train requests")
    add("--max-seconds", type=float, default=120.0, help="give up after S seconds of training")
    add("--seed", type=int, default=0, help="seeds the clients' random examples (0)")
    add("--keep", action="store_true", help="keep the temp dir: config, server log, WAL")
    add(
        "--url",
        help="train the XOR model of a server that is already running (e.g. the README's first "
        "command at http://127.0.0.1:8080) instead of starting one",
    )
    add("--token", help="the server's bearer token, when it has one (with --url)")
    add(
        "--watch",
        action="store_true",
        help="keep training once XOR is learned, until --max-seconds or Ctrl-C: something to "
        "watch on the dashboard",
    )


def run(args: argparse.Namespace) -> int:
    if args.clients < 1:
        print("error: --clients must be at least 1", file=sys.stderr)
        return 2
    try:
        with _sigterm_exits():
            if args.url is not None:
                return _train(_remote(args.url), args)
            return _serve_and_train(args)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _serve_and_train(args: argparse.Namespace) -> int:
    """Start an untrained XOR server in a temporary directory, train it, stop it."""
    workdir = Path(tempfile.mkdtemp(prefix="webtorch-demo-"))
    try:
        with ExitStack() as stack:
            xor_py = stack.enter_context(
                resources.as_file(resources.files("webtorch.examples") / "xor.py")
            )
            started = time.perf_counter()
            server = stack.enter_context(_server(workdir, xor_py))
            ready = time.perf_counter() - started
            host, port = server.host, server.port
            assert port is not None
            target = _Target(
                host, port, f"untrained XOR served at {_url(host, port)} (ready in {ready:.1f} s)"
            )
            return _train(target, args)
    finally:
        if args.keep:
            print(f"kept {workdir} (config.toml, server.log, state/)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C: the finally blocks stop the server rather than orphan it."""

    def exit_(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    try:
        previous, installed = signal.signal(signal.SIGTERM, exit_), True
    except ValueError:  # not the main thread: whoever runs us handles signals
        previous, installed = None, False
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def _server(workdir: Path, xor_py: Path) -> Iterator[Server]:
    """``webtorch serve`` with the untrained XOR model (webtorch_harness: its log goes to a file,
    so a chatty server can never fill a pipe nobody reads); stopped with SIGTERM at the end."""
    config = workdir / "config.toml"
    # JSON string escapes are valid TOML basic-string escapes, whatever the temp path holds.
    state_dir = workdir / "state"
    config.write_text(
        CONFIG.format(path=json.dumps(str(xor_py)), state_dir=json.dumps(str(state_dir)))
    )
    try:
        server = harness.serve(
            config, workdir=workdir, log=workdir / "server.log", timeout=READY_TIMEOUT
        )
    except HarnessError as exc:
        raise DemoError(str(exc)) from None
    try:
        yield server
    finally:
        # graceful: in-flight steps finish, the WAL closes
        status = server.stop(timeout=STOP_TIMEOUT).returncode
        if status != 0:
            print(f"warning: the server exited with status {status}", file=sys.stderr)


@dataclass(frozen=True)
class _Target:
    """The server to train: one the demo started, or one named by --url."""

    host: str
    port: int
    banner: str


def _url(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def _remote(url: str) -> _Target:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise DemoError(f"--url {url!r}: give an http://host:port address")
    port = parts.port or 80
    return _Target(parts.hostname, port, f"training XOR at {_url(parts.hostname, port)}")


def _post(
    conn: http.client.HTTPConnection, path: str, payload: object, token: str | None = None
) -> Any:
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise DemoError(f"POST {path}: {resp.status} {data[:300].decode(errors='replace')}")
    return json.loads(data)


class _Client(threading.Thread):
    """One keep-alive connection sending one random XOR example per train request."""

    def __init__(
        self, host: str, port: int, seed: str, stop: threading.Event, token: str | None
    ) -> None:
        super().__init__(name=f"client-{seed}", daemon=True)
        self.token = token
        self.conn = http.client.HTTPConnection(host, port, timeout=60)
        self.rng = random.Random(seed)
        self.stop = stop
        # (requests, sum of losses, last step), replaced whole so that the reporter thread reads
        # a consistent triple without a lock on the request path.
        self.totals: tuple[int, float, int] = (0, 0.0, 0)
        self.error: str | None = None

    def run(self) -> None:
        requests, loss_sum, step = self.totals
        try:
            while not self.stop.is_set():
                a, b = self.rng.randint(0, 1), self.rng.randint(0, 1)
                answer = _post(
                    self.conn,
                    "/models/xor/train",
                    {"inputs": [[a, b]], "targets": [[a ^ b]]},
                    self.token,
                )
                requests += 1
                loss_sum += float(answer["loss"])
                step = max(step, int(answer["step"]))
                self.totals = (requests, loss_sum, step)
        except Exception as exc:
            if not self.stop.is_set():  # errors after stop are the server going away on purpose
                self.error = str(exc) if isinstance(exc, DemoError) else repr(exc)
                self.stop.set()
        finally:
            self.conn.close()


def _predict(conn: http.client.HTTPConnection) -> list[float]:
    answer = _post(conn, "/models/xor/predict", {"inputs": INPUTS})
    return [float(row[0]) for row in answer["outputs"]]


def _learned(predictions: list[float]) -> bool:
    return all(abs(p - t) < TOLERANCE for p, t in zip(predictions, TRUTH, strict=True))


def _train(target: _Target, args: argparse.Namespace) -> int:
    host, port = target.host, target.port
    print(
        f"webtorch demo: {target.banner}; training it from {args.clients} clients "
        f"(watch at {_url(host, port)}/dashboard)"
    )
    stop = threading.Event()
    clients = [
        _Client(host, port, f"{args.seed}/{i}", stop, args.token) for i in range(args.clients)
    ]
    checker = http.client.HTTPConnection(host, port, timeout=60)
    # (time, requests, loss sum) over the last second, for a loss that moves but does not flicker
    window: collections.deque[tuple[float, int, float]] = collections.deque(maxlen=5)
    shown, step = 0, 0
    started = time.perf_counter()
    next_check = started + CHECK_EVERY
    try:
        for client in clients:
            client.start()
        with tqdm(desc="training", unit="req", dynamic_ncols=True) as bar:
            while not stop.wait(TICK):
                totals = [client.totals for client in clients]
                requests = sum(t[0] for t in totals)
                loss_sum = sum(t[1] for t in totals)
                step = max(t[2] for t in totals)
                now = time.perf_counter()
                window.append((now, requests, loss_sum))
                old_requests, old_loss = window[0][1], window[0][2]
                if requests > old_requests:
                    loss = (loss_sum - old_loss) / (requests - old_requests)
                    bar.set_postfix(loss=f"{loss:.4f}", step=step, refresh=False)
                bar.update(requests - shown)
                shown = requests
                if now >= next_check:
                    next_check = now + CHECK_EVERY
                    if not args.watch and _learned(_predict(checker)):
                        break
                if requests >= args.max_requests or now - started >= args.max_seconds:
                    break
    finally:
        stop.set()
        for client in clients:
            client.join(10)
    elapsed = time.perf_counter() - started
    failures = [client.error for client in clients if client.error is not None]
    if failures:
        raise DemoError(f"a client failed: {failures[0]}")
    requests = sum(client.totals[0] for client in clients)
    step = max(client.totals[2] for client in clients)
    # The clients have stopped, so this is the model as it ends, not one a step behind.
    predictions = _predict(checker)
    checker.close()
    _report(predictions)
    print(
        f"{requests} train requests from {args.clients} clients, {step} optimizer steps, "
        f"{requests / elapsed:.0f} requests/s, {elapsed:.1f} s"
    )
    if _learned(predictions):  # the model as it ends decides, whenever it was first learned
        return 0
    print(
        f"error: XOR not learned after {requests} requests in {elapsed:.1f} s "
        f"(--max-requests {args.max_requests}, --max-seconds {args.max_seconds:g})",
        file=sys.stderr,
    )
    return 1


def _report(predictions: list[float]) -> None:
    good, bad = _marks()
    print()
    print("  input   truth  prediction  rounded")
    for x, truth, p in zip(INPUTS, TRUTH, predictions, strict=True):
        rounded = round(p)
        mark = good if rounded == truth else bad
        print(f"  {x!s:<6}  {truth:>5}  {p:>10.4f}  {rounded:>7}  {mark}")
    print()


def _marks() -> tuple[str, str]:
    """✓ and ✗ where stdout can encode them (a pipe in a C locale may not)."""
    try:
        "✓✗".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "ok", "WRONG"
    return "✓", "✗"
