"""The open-loop load generator: sends the planned requests at their intended times, whatever
the answers do, and records each one (see ``records.py``).

Open loop means a slow answer never delays the next request: every request goes out at its
time on an idle keep-alive connection, or on a new one opened for it when none is idle, and its
latency counts from its intended send time. A request without an answer ``timeout`` seconds
after that time is a failure, and its connection is closed.

As a process (``python -m webtorch_lab.generator``) it reads JSON commands on stdin, one a line,
and answers each with one JSON line: ``{"cmd": "run", "scenario": {...}, "scale": F, "seed": N,
"port": P, "t0": T, "out": PATH}`` sends the scenario's load to 127.0.0.1:P, the measured period
starting at ``time.monotonic() == T`` (the warm-up before it), writes the records to PATH and
answers a summary.
"""

from __future__ import annotations

import asyncio
import gc
import math
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httptools
import orjson

from webtorch_lab.procs import reply as answer
from webtorch_lab.records import Record, Records
from webtorch_lab.scenario import Scenario
from webtorch_lab.schedule import KeyChooser, LoadShape, Planned, SizeChooser, plan

SWEEP_S = 0.005  # how often timeouts are checked
MAX_CONNECTIONS = 8000  # beyond this the generator, not the balancer, would be the problem
PREOPEN = 8  # connections opened before the warm-up starts


def scenario_plan(scenario: Scenario, scale: float, seed: int) -> list[Planned]:
    load = scenario.load
    shape = LoadShape(load.rate, scenario.duration * scale, load.ramp_to, scenario.warmup)
    keys = KeyChooser(load.keys, load.zipf) if load.keys else None
    sizes = SizeChooser([(s.bytes, s.weight) for s in load.sizes]) if load.sizes else None
    return plan(shape, seed, keys, sizes)


def request_head(method: str, path: str, key_header: str, key: str | None, size: int) -> bytes:
    """A request's head; its body is ``size`` bytes sent after it."""
    head = f"{method} {path} HTTP/1.1\r\nhost: lab\r\n"
    if key is not None:
        head += f"{key_header}: {key}\r\n"
    if method != "GET" or size:
        head += f"content-length: {size}\r\n"
    return head.encode() + b"\r\n"


@dataclass(slots=True)
class _Outcome:
    latency: float = math.nan
    status: int = 0
    outcome: str = ""
    upstream: str = ""
    lag: float = 0.0


class ClientConnection(asyncio.Protocol):
    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.current: int | None = None  # the request in flight
        self.upstream = ""
        self.keep_alive = True
        self.dead = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, index: int, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.current = index
        self.upstream = ""
        self.transport.write(head)
        if body:
            self.transport.write(body)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail("error")

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-upstream":
            self.upstream = value.decode("latin-1")

    def on_message_complete(self) -> None:
        index, self.current = self.current, None
        self.keep_alive = self.parser.should_keep_alive()
        if index is not None:
            self.generator.answered(index, self.parser.get_status_code(), self.upstream)
        if self.keep_alive and not self.dead:
            self.generator.idle.append(self)
        else:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.dead = True
        self.generator.open.discard(self)
        if self.current is not None:
            index, self.current = self.current, None
            self.generator.failed(index, "error")

    def fail(self, outcome: str) -> None:
        index, self.current = self.current, None
        if index is not None:
            self.generator.failed(index, outcome)
        self.close()

    def close(self) -> None:
        self.dead = True
        if self.transport is not None:
            self.transport.abort()


class Generator:
    def __init__(
        self,
        planned: Sequence[Planned],
        port: int,
        t0: float,
        timeout: float,
        method: str,
        path: str,
        key_header: str,
    ) -> None:
        self.planned = planned
        self.port = port
        self.t0 = t0
        self.timeout = timeout
        self.heads = [request_head(method, path, key_header, p.key, p.size) for p in planned]
        self.bodies = {size: b"x" * size for size in {p.size for p in planned}}
        self.outcomes = [_Outcome() for _ in planned]
        self.idle: list[ClientConnection] = []
        self.open: set[ClientConnection] = set()
        self.inflight: dict[int, ClientConnection | None] = {}  # None: waiting for a connect
        self.sent: deque[int] = deque()  # requests in order of dispatch, hence of deadline
        self.tasks: set[asyncio.Task[None]] = set()
        self.next = 0
        self.max_open = 0
        self.opened = 0
        self.finished = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(PREOPEN):
            conn = await self._connect()
            if conn is not None:
                self.idle.append(conn)
        self._arm(loop)
        self._sweeper = loop.call_later(SWEEP_S, self._sweep)
        if not self.planned:
            self.finished.set()
        await self.finished.wait()
        self._sweeper.cancel()
        for conn in list(self.open):
            conn.close()
        for task in list(self.tasks):
            task.cancel()

    # -- sending ----------------------------------------------------------------------------

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.next < len(self.planned):
            delay = self.planned[self.next].t - self.now()
            self._timer = loop.call_later(max(0.0, delay), self._due)

    def _due(self) -> None:
        now = self.now()
        planned = self.planned
        while self.next < len(planned) and planned[self.next].t <= now:
            self._dispatch(self.next, now)
            self.next += 1
        self._arm(asyncio.get_running_loop())

    def _dispatch(self, index: int, now: float) -> None:
        self.outcomes[index].lag = now - self.planned[index].t
        self.sent.append(index)
        while self.idle:
            conn = self.idle.pop()
            if not conn.dead:
                self.inflight[index] = conn
                self._send(conn, index)
                return
        if len(self.open) + len(self.tasks) >= MAX_CONNECTIONS:
            self._record(index, "error")
            return
        self.inflight[index] = None
        task = asyncio.get_running_loop().create_task(self._send_on_new(index))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self) -> ClientConnection | None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: ClientConnection(self), "127.0.0.1", self.port
            )
        except OSError:
            return None
        self.opened += 1
        self.open.add(conn)
        self.max_open = max(self.max_open, len(self.open))
        return conn

    async def _send_on_new(self, index: int) -> None:
        conn = await self._connect()
        if index not in self.inflight:  # timed out while connecting: keep the connection
            if conn is not None:
                self.idle.append(conn)
            return
        if conn is None:
            self.failed(index, "error")
            return
        self.inflight[index] = conn
        self._send(conn, index)

    def _send(self, conn: ClientConnection, index: int) -> None:
        conn.send(index, self.heads[index], self.bodies[self.planned[index].size])

    # -- outcomes ---------------------------------------------------------------------------

    def answered(self, index: int, status: int, upstream: str) -> None:
        if index not in self.inflight:
            return
        del self.inflight[index]
        outcome = self.outcomes[index]
        outcome.latency = self.now() - self.planned[index].t
        outcome.status = status
        outcome.outcome = "ok" if 200 <= status < 300 else "http"
        outcome.upstream = upstream
        self._check_done()

    def failed(self, index: int, kind: str) -> None:
        """The request in flight at ``index`` failed (if it is still in flight)."""
        if index in self.inflight:
            del self.inflight[index]
            self._record(index, kind)

    def _record(self, index: int, kind: str) -> None:
        outcome = self.outcomes[index]
        outcome.latency = self.now() - self.planned[index].t
        outcome.outcome = kind
        self._check_done()

    def _sweep(self) -> None:
        cutoff = self.now() - self.timeout
        sent, planned = self.sent, self.planned
        late = []
        while sent and planned[sent[0]].t <= cutoff:
            index = sent.popleft()
            if index in self.inflight:
                late.append(index)
        for index in late:
            conn = self.inflight.pop(index)
            outcome = self.outcomes[index]
            outcome.latency = self.timeout
            outcome.outcome = "timeout"
            if conn is not None:
                conn.current = None
                conn.close()
        if late:
            self._check_done()
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_S, self._sweep)

    def _check_done(self) -> None:
        if self.next >= len(self.planned) and not self.inflight:
            self.finished.set()

    # -- results ----------------------------------------------------------------------------

    def records(self) -> Records:
        rows = [
            Record(
                p.t,
                o.latency,
                o.status,
                o.outcome or "error",
                o.upstream,
                p.key or "",
                p.size,
                o.lag,
            )
            for p, o in zip(self.planned, self.outcomes, strict=True)
            if p.t >= 0
        ]
        return Records(rows)

    def summary(self) -> dict[str, Any]:
        lags = sorted(o.lag for p, o in zip(self.planned, self.outcomes, strict=True) if p.t >= 0)
        n = len(lags)
        return {
            "requests": n,
            "lag_p50": lags[n // 2] if n else 0.0,
            "lag_p99": lags[min(n - 1, int(n * 0.99))] if n else 0.0,
            "lag_max": lags[-1] if n else 0.0,
            "max_open": self.max_open,
            "opened": self.opened,
        }


async def run_once(command: dict[str, Any]) -> dict[str, Any]:
    scenario = Scenario.model_validate(command["scenario"])
    load = scenario.load
    planned = scenario_plan(scenario, command["scale"], command["seed"])
    generator = Generator(
        planned,
        command["port"],
        command["t0"],
        load.timeout,
        load.method,
        load.path,
        load.key_header,
    )
    gc.collect()
    gc.freeze()  # the plan is long-lived: keep it out of the collections that pause sending
    try:
        await generator.run()
    finally:
        gc.unfreeze()
    generator.records().write(Path(command["out"]))
    return {"done": generator.summary()}


async def serve_commands() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        command = orjson.loads(line)
        try:
            if command["cmd"] == "run":
                reply = await run_once(command)
            else:
                reply = {"error": f"unknown command {command['cmd']!r}"}
        except Exception as exc:  # answered, so the runner can say what went wrong
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        answer(reply)


def main() -> None:
    from webtorch_lab.procs import serve_helper

    serve_helper(serve_commands)


if __name__ == "__main__":
    main()
