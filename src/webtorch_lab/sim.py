"""Simulated upstreams: real HTTP/1.1 servers on loopback, many in one process, each driven by a
:class:`~webtorch_lab.model.UpstreamModel`.

Paths: ``/health`` (and ``/v2/health/live``, ``/v2/health/ready``) answer 200 unless the
upstream is a black hole (no answer) or down (connection refused); ``/v2/health/load`` answers
``{"inflight": n, "latency": seconds}``, WebTorch's load probe format; anything else is work,
handed to the model, and answered ``{"upstream": NAME}`` with an ``x-upstream: NAME`` header.

As a process (``python -m webtorch_lab.sim``) it is a host for many runs: it reads JSON commands
on stdin, one a line, and answers each with one JSON line on stdout:

- ``{"cmd": "up", "scenario": {...}, "scale": F, "seed": N}``: fresh upstreams on free ports;
  answers ``{"ports": {name: port}}``;
- ``{"cmd": "start", "t0": T}``: the run's clock starts at ``time.monotonic() == T`` (faults and
  counters are relative to it); answers ``{"ok": true}``;
- ``{"cmd": "stop"}``: closes every upstream; answers ``{"stats": {name: counters}}``.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import httptools
import orjson

from webtorch_lab import model
from webtorch_lab.procs import reply as answer
from webtorch_lab.scenario import Scenario

# Before "start" the clock reads about -1e6 s: every moment counts as warm-up.
BEFORE_START = 1e6
HEALTH_PATHS = frozenset({b"/health", b"/v2/health/live", b"/v2/health/ready"})
LOAD_PATH = b"/v2/health/load"
REASONS = {200: b"OK", 429: b"Too Many Requests", 500: b"Internal Server Error"}


def reason(status: int) -> bytes:
    if status in REASONS:
        return REASONS[status]
    return b"Service Unavailable" if status == 503 else b"Status"


class Clock:
    """Seconds since the run's start (``t0``, a ``time.monotonic()`` reading, the same clock in
    every process of the machine); far in the warm-up until the run's start is set."""

    def __init__(self) -> None:
        self.t0 = time.monotonic() + BEFORE_START

    def now(self) -> float:
        return time.monotonic() - self.t0

    def delay_until(self, at: float) -> float:
        """Seconds from now until run time ``at``."""
        return max(0.0, self.t0 + at - time.monotonic())


class _Slot:
    """One request's place in a connection's answer order."""

    __slots__ = ("data", "keep_alive")

    def __init__(self, keep_alive: bool) -> None:
        self.data: bytes | None = None
        self.keep_alive = keep_alive


class SimUpstream:
    """One simulated upstream: its model, its listening socket and its connections."""

    def __init__(
        self, params: model.UpstreamParams, rng: random.Random, clock: Clock, key_header: str
    ) -> None:
        self.params = params
        self.model = model.UpstreamModel(params, rng)
        self.clock = clock
        self.key_header = key_header.lower().encode()
        self.name = params.name
        self.port = 0
        self.server: asyncio.Server | None = None
        self.connections: set[SimConnection] = set()
        self.owners: dict[int, tuple[SimConnection, _Slot]] = {}  # rid -> where its answer goes
        self.timers: set[asyncio.TimerHandle] = set()
        self.next_rid = 0
        body = orjson.dumps({"upstream": self.name})
        self._answers: dict[int, bytes] = {}
        self._body = body

    # -- listening --------------------------------------------------------------------------

    async def listen(self, host: str = "127.0.0.1") -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SimConnection(self), host, self.port, reuse_address=True, backlog=1024
        )
        self.port = self.server.sockets[0].getsockname()[1]

    def go_down(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for conn in list(self.connections):
            conn.abort()

    def go_up(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self.listen())

    def close(self) -> None:
        self.go_down()
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()

    # -- requests ---------------------------------------------------------------------------

    def answer(self, status: int, body: bytes | None = None, keep_alive: bool = True) -> bytes:
        if body is None and keep_alive:
            cached = self._answers.get(status)
            if cached is not None:
                return cached
        payload = self._body if body is None else body
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nx-upstream: %s\r\n"
            b"content-length: %d\r\n%s\r\n"
            % (
                status,
                reason(status),
                self.name.encode(),
                len(payload),
                b"" if keep_alive else b"connection: close\r\n",
            )
        )
        data = head + payload
        if body is None and keep_alive:
            self._answers[status] = data
        return data

    def request(self, conn: SimConnection, path: bytes, key: str | None, size: int) -> None:
        keep_alive = conn.parser.should_keep_alive()
        slot = _Slot(keep_alive)
        conn.slots.append(slot)
        now = self.clock.now()
        if path in HEALTH_PATHS:
            if self.model.healthy(now):
                self._fill(conn, slot, self.answer(200, b'{"status":"ok"}', keep_alive))
            return  # a black hole never answers: the slot stays empty
        if path == LOAD_PATH:
            if self.model.healthy(now):
                inflight, latency = self.model.load()
                body = orjson.dumps({"inflight": inflight, "latency": latency})
                self._fill(conn, slot, self.answer(200, body, keep_alive))
            return
        rid = self.next_rid
        self.next_rid += 1
        self.owners[rid] = (conn, slot)
        conn.rids.add(rid)
        action = self.model.arrive(rid, now, key, size)
        if isinstance(action, model.Respond):
            self._schedule(action)

    def _schedule(self, action: model.Respond) -> None:
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def fire() -> None:
            assert timer is not None
            self.timers.discard(timer)
            self._done(action)

        timer = loop.call_later(self.clock.delay_until(action.at), fire)
        self.timers.add(timer)

    def _done(self, action: model.Respond) -> None:
        for started in self.model.complete(action.rid, self.clock.now()):
            self._schedule(started)
        owner = self.owners.pop(action.rid, None)
        if owner is None:
            return  # the client left
        conn, slot = owner
        conn.rids.discard(action.rid)
        self._fill(conn, slot, self.answer(action.status, None, slot.keep_alive))

    def _fill(self, conn: SimConnection, slot: _Slot, data: bytes) -> None:
        slot.data = data
        conn.flush()

    def forget(self, conn: SimConnection) -> None:
        """``conn`` closed: its queued and held requests are cancelled."""
        self.connections.discard(conn)
        for rid in conn.rids:
            self.owners.pop(rid, None)
            self.model.cancel(rid)
        conn.rids.clear()


class SimConnection(asyncio.Protocol):
    def __init__(self, upstream: SimUpstream) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.slots: deque[_Slot] = deque()
        self.rids: set[int] = set()
        self._url = b""
        self._key: str | None = None
        self._length: int | None = None
        self._body = 0
        self._closing = False

    # -- asyncio ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.upstream.connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.upstream.forget(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._key = None
        self._length = None
        self._body = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == self.upstream.key_header:
            self._key = value.decode("latin-1")
        elif lower == b"content-length" and value.isdigit():
            self._length = int(value)

    def on_body(self, body: bytes) -> None:
        self._body += len(body)

    def on_message_complete(self) -> None:
        path = self._url.partition(b"?")[0]
        size = self._length if self._length is not None else self._body
        self.upstream.request(self, path, self._key, size)

    # -- answers in order -------------------------------------------------------------------

    def flush(self) -> None:
        while self.slots and self.slots[0].data is not None:
            slot = self.slots.popleft()
            if self.transport is None or self._closing:
                return
            assert slot.data is not None
            self.transport.write(slot.data)
            if not slot.keep_alive:
                self.close()


class SimHost:
    """The upstreams of one run, built from a scenario."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.upstreams: list[SimUpstream] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.timers: list[asyncio.TimerHandle] = []

    async def up(self, scenario: Scenario, scale: float, seed: int) -> dict[str, int]:
        self.clock = Clock()
        self.upstreams = [
            SimUpstream(p, random.Random(f"{seed}:{p.name}"), self.clock, scenario.load.key_header)
            for p in scenario.params(scale)
        ]
        for upstream in self.upstreams:
            await upstream.listen()
        return {u.name: u.port for u in self.upstreams}

    def start(self, t0: float) -> None:
        self.clock.t0 = t0
        loop = asyncio.get_running_loop()
        for upstream in self.upstreams:
            for start, end in upstream.params.faults.down_windows():
                self.timers.append(loop.call_later(self.clock.delay_until(start), upstream.go_down))
                if math.isfinite(end):
                    self.timers.append(
                        loop.call_later(self.clock.delay_until(end), self._up_again(upstream))
                    )

    def _up_again(self, upstream: SimUpstream) -> Callable[[], None]:
        def up() -> None:
            task = upstream.go_up()
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        return up

    async def stop(self) -> dict[str, Any]:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        for task in list(self.tasks):
            task.cancel()
        stats = {u.name: u.model.stats.to_json() for u in self.upstreams}
        for upstream in self.upstreams:
            upstream.close()
        self.upstreams = []
        await asyncio.sleep(0)  # let the transports' close callbacks run
        return stats


async def serve_commands() -> None:
    """The process's main loop: commands on stdin, answers on stdout (see the module doc)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    host = SimHost()
    while True:
        line = await reader.readline()
        if not line:
            await host.stop()
            return
        command = orjson.loads(line)
        reply: dict[str, Any]
        try:
            if command["cmd"] == "up":
                await host.stop()
                scenario = Scenario.model_validate(command["scenario"])
                reply = {"ports": await host.up(scenario, command["scale"], command["seed"])}
            elif command["cmd"] == "start":
                host.start(command["t0"])
                reply = {"ok": True}
            elif command["cmd"] == "stop":
                reply = {"stats": await host.stop()}
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
