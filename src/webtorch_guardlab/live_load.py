"""Load for the guard's live evaluation (``live.py``), each client from its own 127/8 source
address: Linux delivers all of 127.0.0.0/8 to the loopback device, so one machine can play many
clients and the server sees each as a separate address.

Three roles, one per process (the caller pins it to another core than the server's):

- ``benign``: users with think time. Each client asks at its own Poisson rate (open loop: a slow
  answer never delays the next request, which then goes out on another of the client's keep-alive
  connections, at most ``max_conns``, as a browser does); latency counts from the intended send
  time, so queueing in the server is not hidden (no coordinated omission).
- ``flood``: an HTTP keep-alive flood: ``per_address`` connections from each address, each sending
  its next request as soon as the previous one is answered, whatever the answer (a 429's
  Retry-After is ignored, as a flood tool ignores it); a connection the server closes or refuses
  is opened again at once. Outcomes are counted in time bins, and the first refusal is noted with
  the number of requests served before it.
- ``open``: a fixed arrival rate spread over pre-opened connections from many addresses (the guard
  cost measurement: no address goes over the token bucket's rate).

``python -I live_load.py SPEC.json`` runs the spec and writes what it measured, one JSON object,
to the spec's ``out`` file. It imports nothing of WebTorch (whose package imports torch: seconds
of start-up and hundreds of MB per generator). Raw sockets on asyncio protocols with a minimal
response parser: an HTTP client library would be the bottleneck, not the server.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

OK, THROTTLED, BLOCKED, ERROR, DROPPED = range(5)  # outcome categories of a flood response
OUTCOMES = ("ok", "throttled", "blocked", "error", "dropped")
CONNECT_ERROR, TIMEOUT = -1, -2  # statuses recorded for requests that got no answer

_WORDS = (
    "weather berlin",
    "cheap flights",
    "python asyncio",
    "union jack",
    "o'brien",
    "best pizza near me",
    "torch tensor shape",
    "select a plan",
    "how to train a model",
    "résumé template",
)
_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 "
    "Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "python-requests/2.32.3",
    "curl/8.5.0",
    "tritonclient/2.50.0",
)


def _query(rng: random.Random) -> str:
    from urllib.parse import quote_plus

    kind = rng.randrange(7)
    if kind == 0:
        return ""
    if kind == 1:
        return f"session={rng.randbytes(8).hex()}&lang={rng.choice(['en', 'de', 'fr', 'pt-BR'])}"
    if kind == 2:
        return f"page={rng.randrange(1, 40)}&sort={rng.choice(['asc', 'desc'])}"
    if kind == 3:
        return f"q={quote_plus(rng.choice(_WORDS))}"
    if kind == 4:
        return f"utm_source=newsletter&utm_campaign={rng.choice(['spring', 'launch', 'w47'])}"
    if kind == 5:
        return f"ts={rng.randrange(1_700_000_000, 1_800_000_000)}&v={rng.randrange(1, 9)}"
    return f"id={rng.randrange(10**6)}&ref={quote_plus('https://example.com/a?b=' + str(kind))}"


def request_pool(seed: int, n: int = 512) -> list[bytes]:
    """``n`` varied, ordinary requests to the XOR example's server (the live eval's config):
    predictions with 1-4 rows, the fixed route ``/``, model metadata and health; query strings,
    user agents and optional headers as real clients send them."""
    rng = random.Random(f"live:{seed}")
    out = []
    for _ in range(n):
        kind = rng.randrange(10)
        query = _query(rng)
        body = b""
        if kind < 5:
            method, path = "POST", "/models/xor/predict"
            rows = [[rng.randint(0, 1), rng.randint(0, 1)] for _ in range(rng.choice([1, 1, 2, 4]))]
            body = json.dumps({"inputs": rows}).encode()
        elif kind < 7:
            method, path = "GET", "/"
        elif kind < 8:
            method, path = "GET", "/v2/models/xor"
        else:
            method, path = "GET", rng.choice(["/v2/health/ready", "/v2/health/live"])
        target = path + (f"?{query}" if query and path != "/v2/health/live" else "")
        lines = [
            f"{method} {target} HTTP/1.1",
            "Host: 127.0.0.1",
            f"User-Agent: {rng.choice(_AGENTS)}",
            f"Accept: {rng.choice(['*/*', 'application/json', 'text/html,*/*;q=0.8'])}",
        ]
        if rng.random() < 0.6:
            lines.append(f"Accept-Language: {rng.choice(['en-US,en;q=0.9', 'de-DE,de;q=0.8'])}")
        if rng.random() < 0.3:
            lines.append(f"Cookie: sid={rng.randbytes(12).hex()}; theme=dark")
        if rng.random() < 0.2:
            lines.append(f"X-Request-Id: {rng.randbytes(8).hex()}")
        if body:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        out.append("\r\n".join(lines).encode("utf-8") + b"\r\n\r\n" + body)
    return out


def parse_response(buf: bytes) -> tuple[int, int, bool] | None:
    """``(status, length of the whole response, connection closes)`` of the response at the start
    of ``buf``, or None while it is incomplete. Content-Length bodies only (what WebTorch sends
    to these requests)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end]
    i = head.find(b"\r\ncontent-length:")  # WebTorch's header names are lower-case
    if i < 0:
        head = head.lower()
        i = head.find(b"\r\ncontent-length:")
    length = 0
    if i >= 0:
        j = head.find(b"\r\n", i + 2)
        length = int(head[i + 17 : j if j >= 0 else len(head)])
    total = end + 4 + length
    if len(buf) < total:
        return None
    closes = b"close" in head and b"\r\nconnection: close" in head.lower()
    return int(buf[9:12]), total, closes


def outcome(status: int) -> int:
    if 200 <= status < 300:
        return OK
    if status == 429:
        return THROTTLED
    if status == 403:
        return BLOCKED
    return ERROR


# -- one request at a time (benign, open) -----------------------------------------------------


class _Conn(asyncio.Protocol):
    """A keep-alive connection for one request at a time, answered through a future."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bool]] | None = None
        self.buf = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        parsed = parse_response(self.buf)
        if parsed is None:
            return
        status, total, closes = parsed
        self.buf = self.buf[total:]
        if closes:
            self.close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, closes))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((CONNECT_ERROR, True))

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bool]]:
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            # Closed by the server (refused at accept: it resets the connection) before this.
            waiter.set_result((CONNECT_ERROR, True))
        else:
            transport.write(request)
        return waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Pool:
    """Connections to the server from ``addresses`` (round robin), at most ``limit`` open; the
    idle one used longest ago is reused first, which spreads requests over the addresses."""

    def __init__(self, port: int, addresses: Sequence[str], limit: int) -> None:
        self.port = port
        self.addresses = list(addresses)
        self.next_address = 0
        self.idle: deque[_Conn] = deque()
        self.slots = asyncio.Semaphore(limit)

    async def open(self) -> _Conn:
        address = self.addresses[self.next_address % len(self.addresses)]
        self.next_address += 1
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            _Conn, "127.0.0.1", self.port, local_addr=(address, 0)
        )
        return conn

    async def request(self, data: bytes, limit: float) -> int:
        """Send ``data``; its status, or TIMEOUT if unanswered within ``limit`` seconds."""
        async with self.slots:
            conn = None
            while self.idle and conn is None:
                conn = self.idle.popleft()
                if conn.closed:
                    conn = None
            try:
                if conn is None:
                    conn = await asyncio.wait_for(self.open(), limit)
                status, closes = await asyncio.wait_for(conn.send(data), limit)
            except TimeoutError:
                if conn is not None:
                    conn.close()
                return TIMEOUT
            except OSError:
                return CONNECT_ERROR
            if not closes and not conn.closed:
                self.idle.append(conn)
            return status

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class _Recorder:
    """Requests sent at planned times; ``records``: (planned time from t0, latency, status)."""

    def __init__(self, t0: float, timeout: float) -> None:
        self.t0 = t0
        self.timeout = timeout
        self.records: list[tuple[float, float, int]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, pool: _Pool, data: bytes, planned: float) -> None:
        task = asyncio.get_running_loop().create_task(self._one(pool, data, planned))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, pool: _Pool, data: bytes, planned: float) -> None:
        status = await pool.request(data, self.timeout)
        latency = time.monotonic() - planned
        self.records.append((round(planned - self.t0, 4), round(latency, 6), status))

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks))


async def benign(spec: dict[str, Any]) -> dict[str, Any]:
    """Clients with think time: each its own address and Poisson rate in [rate_min, rate_max]."""
    t0, duration = float(spec["t0"]), float(spec["duration"])
    rng = random.Random(spec.get("seed", 0))
    requests = request_pool(int(spec.get("seed", 0)))
    recorder = _Recorder(t0, float(spec.get("timeout", 5.0)))
    pools = [
        _Pool(int(spec["port"]), [address], int(spec.get("max_conns", 4)))
        for address in spec["clients"]
    ]

    async def client(pool: _Pool, rate: float, seed: int) -> None:
        own = random.Random(seed)
        planned = t0 + own.expovariate(rate)
        while planned < t0 + duration:
            await _sleep_until(planned)
            recorder.start(pool, own.choice(requests), planned)
            planned += own.expovariate(rate)

    lo, hi = float(spec.get("rate_min", 2.0)), float(spec.get("rate_max", 5.0))
    await asyncio.gather(
        *(client(pool, rng.uniform(lo, hi), rng.randrange(2**32)) for pool in pools)
    )
    await recorder.drain()
    for pool in pools:
        pool.close()
    return {"records": recorder.records}


async def open_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """A fixed arrival rate (Poisson) over one pre-opened connection per address."""
    t0, duration, rate = float(spec["t0"]), float(spec["duration"]), float(spec["rate"])
    addresses = spec["addresses"]
    pool = _Pool(int(spec["port"]), addresses, int(spec.get("max_conns", 4 * len(addresses))))
    for conn in await asyncio.gather(*(pool.open() for _ in addresses)):
        pool.idle.append(conn)
    recorder = _Recorder(t0, float(spec.get("timeout", 5.0)))
    rng = random.Random(spec.get("seed", 0))
    requests = request_pool(int(spec.get("seed", 0)))
    planned = t0
    while planned < t0 + duration:
        await _sleep_until(planned)
        recorder.start(pool, rng.choice(requests), planned)
        planned += rng.expovariate(rate)
    await recorder.drain()
    pool.close()
    return {"records": recorder.records}


# -- as fast as possible (flood) --------------------------------------------------------------


class _Flood:
    """The flood's shared state: counts per time bin, the first refusal."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.port = int(spec["port"])
        self.t0 = float(spec["t0"])
        self.end = self.t0 + float(spec["duration"])
        self.bin = float(spec.get("bin", 0.1))
        self.bins = [
            [0] * len(OUTCOMES) for _ in range(int(float(spec["duration"]) / self.bin) + 1)
        ]
        self.requests = request_pool(int(spec.get("seed", 0)) + 1)
        self.rng = random.Random(spec.get("seed", 0))
        self.running = True
        self.served = 0  # 2xx answers so far
        self.first_refusal: float | None = None  # seconds from t0
        self.served_before: int | None = None  # 2xx answers before the first refusal
        self.first_throttle: float | None = None  # the first 429 or refused connection
        self.served_before_throttle: int | None = None
        self.connections: set[_Flooder] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def count(self, kind: int) -> None:
        now = time.monotonic()
        if now >= self.end:
            self.running = False
            return
        self.bins[int((now - self.t0) / self.bin)][kind] += 1
        if kind == OK:
            self.served += 1
        elif kind != ERROR:
            if self.first_refusal is None:
                self.first_refusal = now - self.t0
                self.served_before = self.served
            if self.first_throttle is None and kind != BLOCKED:
                self.first_throttle = now - self.t0
                self.served_before_throttle = self.served

    def next_request(self) -> bytes:
        return self.requests[self.rng.randrange(len(self.requests))]

    def connect(self, address: str) -> None:
        if not self.running:
            return
        task = asyncio.get_running_loop().create_task(self._connect(address))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(
                lambda: _Flooder(self, address), "127.0.0.1", self.port, local_addr=(address, 0)
            )
        except OSError:
            self.count(DROPPED)
            await asyncio.sleep(0.01)  # the listen queue is full, or the server is gone
            self.connect(address)


class _Flooder(asyncio.Protocol):
    def __init__(self, flood: _Flood, address: str) -> None:
        self.flood = flood
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flood.connections.add(self)
        transport.write(self.flood.next_request())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        flood = self.flood
        closes = False
        while (parsed := parse_response(buf)) is not None:
            status, total, closes = parsed
            buf = buf[total:]
            self.answered += 1
            flood.count(outcome(status))
        self.buf = buf
        transport = self.transport
        if transport is None:
            return
        if closes or not flood.running:
            transport.close()
        elif not buf:
            transport.write(flood.next_request())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        flood = self.flood
        flood.connections.discard(self)
        if not flood.running:
            return
        if self.answered == 0:
            flood.count(DROPPED)  # closed before an answer: refused at accept, or reset
        flood.connect(self.address)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def flood(spec: dict[str, Any]) -> dict[str, Any]:
    state = _Flood(spec)
    await _sleep_until(state.t0)
    for _ in range(int(spec.get("per_address", 2))):
        for address in spec["addresses"]:
            state.connect(address)
    await _sleep_until(state.end)
    state.running = False
    for conn in list(state.connections):
        conn.close()
    for task in list(state.tasks):
        task.cancel()
    await asyncio.sleep(0.05)
    return {
        "bin": state.bin,
        "bins": state.bins,
        "first_refusal": state.first_refusal,
        "served_before": state.served_before,
        "first_throttle": state.first_throttle,
        "served_before_throttle": state.served_before_throttle,
    }


ROLES = {"benign": benign, "open": open_loop, "flood": flood}


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    with open(args[0]) as f:
        spec = json.load(f)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - a dependency of the project
        runner = asyncio.run
    gc.disable()  # no collector pauses inside the measurement; the process is short-lived
    result = runner(ROLES[spec["role"]](spec))
    with open(spec["out"], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
