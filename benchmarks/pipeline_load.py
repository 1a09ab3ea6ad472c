"""The load generator of benchmarks/pipeline.py: HTTP/1.1 keep-alive connections on uvloop, the
answers parsed with httptools, so that the client's own cost per request stays a small share of
a two-core machine. Two ways to load a server:

- :func:`closed_loop`: ``connections`` clients each send the next request as soon as the last is
  answered, for ``duration`` seconds: the throughput a server reaches.
- :func:`open_loop`: requests start at a fixed rate whatever the server does (a new connection
  when every open one is busy), and each one's latency counts from when it was DUE, so a server
  that falls behind is charged for the queue it builds (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httptools

TIMEOUT = 30.0  # seconds one request may take before it counts as failed
MAX_CONNECTIONS = 512  # the open loop's connections at most; beyond, a due request waits


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionError("connection closed"))

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), b"".join(self.body)))
        self.body = []

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await asyncio.wait_for(self.waiter, TIMEOUT)


async def _connect(host: str, port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Conn, host, port)
    return conn


def request_bytes(host: str, port: int, path: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Result:
    """What one phase saw: latencies of answered requests (seconds), errors by kind."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one(conn: _Conn, raw: bytes, due: float, result: Result) -> bool:
    try:
        status, _ = await conn.request(raw)
    except (TimeoutError, ConnectionError, OSError, httptools.HttpParserError) as exc:
        result.error(type(exc).__name__)
        return False
    if status != 200:
        result.error(str(status))
        return True
    result.latencies.append(time.perf_counter() - due)
    return True


async def closed_loop(
    host: str, port: int, requests: Sequence[bytes], connections: int, duration: float
) -> Result:
    result = Result()
    cycle = itertools.cycle(requests)
    end = time.perf_counter() + duration

    async def client() -> None:
        conn = await _connect(host, port)
        while time.perf_counter() < end:
            start = time.perf_counter()
            result.sent += 1
            if not await _one(conn, next(cycle), start, result) or conn.closed:
                conn = await _connect(host, port)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    result.seconds = time.perf_counter() - started
    return result


async def open_loop(
    host: str, port: int, requests: Sequence[bytes], rate: float, duration: float
) -> Result:
    result = Result()
    idle: list[_Conn] = []
    opened = 0
    slots = asyncio.Semaphore(MAX_CONNECTIONS)
    tasks: set[asyncio.Task[None]] = set()

    async def send(raw: bytes, due: float) -> None:
        nonlocal opened
        async with slots:
            conn = idle.pop() if idle else None
            if conn is None or conn.closed:
                try:
                    conn = await _connect(host, port)
                except OSError as exc:
                    result.error(type(exc).__name__)
                    return
                opened += 1
            if await _one(conn, raw, due, result) and not conn.closed:
                idle.append(conn)

    count = int(rate * duration)
    started = time.perf_counter()
    for i, raw in zip(range(count), itertools.cycle(requests), strict=False):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        result.sent += 1
        task = asyncio.create_task(send(raw, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - started
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()
    return result
