"""The connections to one upstream (:class:`ConnectionPool`): idle ones reused, new ones opened
up to a limit, waiters queued, deadlines swept; and the :class:`Flusher` that writes a loop
iteration's requests together.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Final, cast

from webtorch.http.client.connection import UpstreamConnection
from webtorch.http.client.settings import PoolSettings
from webtorch.vocab import Outcome, Upstream

log: Final = logging.getLogger("webtorch.proxy")


# An upstream's problems (invalid responses, limits) are logged at most once per this many
# seconds per upstream, the rest counted: a misbehaving upstream must not flood the log.
WARN_INTERVAL: Final = 60.0


class Flusher:
    """Writes the requests queued on a pool's connections once per event loop iteration.

    uvloop writes to the socket inside ``transport.write``. Each request written to an upstream
    that sleeps in epoll wakes it, and on these machines a wake-up across cores costs more than
    the write itself. Holding the writes of one iteration (the requests of every client read in
    it) and writing them together, right after that iteration's I/O callbacks, wakes the upstream
    once for all of them: measured with benchmarks/proxy.py at 32 connections, the proxy's
    kernel time per request fell from 17-19 us to 13-14 us. What it costs: a request waits for
    the rest of its iteration's callbacks (microseconds) before it leaves.
    """

    __slots__ = ("_conns", "_scheduled", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._conns: list[UpstreamConnection] = []
        self._scheduled = False

    def add(self, conn: UpstreamConnection) -> None:
        self._conns.append(conn)
        if not self._scheduled:
            self._scheduled = True
            # call_soon: run at the start of the next iteration, before it polls again.
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.flush()
            except Exception:  # one broken transport must not hold up the others' requests
                log.exception("writing to upstream %s failed", conn.pool.upstream.address)
                conn.close()


# Idle connections above ``keepalive`` are closed once they have been idle this long.
TRIM_AFTER: Final = 1.0

# What waits for a connection: called with one, or with None and why not.
Waiter = Callable[["UpstreamConnection | None", Outcome, str], None]


class ConnectionPool:
    """Connections to one upstream: idle ones reused newest first (so a quiet period lets the
    others reach their idle timeout), new ones opened up to ``max_connections``, then waiters
    queue until a connection is released or ``connect_timeout`` passes.

    ``keepalive`` bounds the idle connections kept for long: a surplus left by a burst is closed
    after TRIM_AFTER seconds idle, so the open connections never exceed the peak concurrency
    (or ``max_connections``) and settle at ``keepalive`` when the load does.
    """

    def __init__(
        self, upstream: Upstream, settings: PoolSettings, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.upstream = upstream
        self.settings = settings
        self.loop = loop
        # The settings this pool and its connections read per request, as native attributes:
        # PoolSettings is a pydantic model, whose attributes compiled code looks up by name.
        self.keepalive: int = settings.keepalive
        self.max_connections: int = settings.max_connections
        self.idle_timeout: float = settings.idle_timeout
        self.max_requests: int = settings.max_requests_per_connection
        self.connect_timeout: float = settings.connect_timeout
        self.read_timeout: float = settings.read_timeout
        self.total_timeout: float = settings.total_timeout
        self.max_header_bytes: int = settings.max_response_header_bytes
        self.max_headers: int = settings.max_response_headers
        self.idle: list[UpstreamConnection] = []
        self.busy: set[UpstreamConnection] = set()
        self.connecting: set[asyncio.Task[None]] = set()
        self.waiters: deque[tuple[float, Waiter]] = deque()
        self.closed = False
        self.opened = 0  # connections opened in this pool's life (metrics, tests)
        # Bound once: compiled code calls a method of a non-native object by name, looking it
        # up each time; these run several times per proxied request.
        self.time: Callable[[], float] = loop.time
        self.flusher = Flusher(loop)
        self._warn_after = 0.0  # see warn()
        self._unwarned = 0

    def warn(self, message: str) -> None:
        """Log an upstream's problem, at most once per WARN_INTERVAL (counting the rest)."""
        now = self.time()
        if now < self._warn_after:
            self._unwarned += 1
            return
        self._warn_after = now + WARN_INTERVAL
        unwarned, self._unwarned = self._unwarned, 0
        if unwarned:
            log.warning("%s (and %d more problems not logged)", message, unwarned)
        else:
            log.warning("%s", message)

    @property
    def open_count(self) -> int:
        return len(self.idle) + len(self.busy) + len(self.connecting)

    def acquire(self, waiter: Waiter) -> UpstreamConnection | None:
        """A connection now, or None and ``waiter`` is called later (connected or failed)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self.busy.add(conn)
                return conn
        limit = self.max_connections
        if limit and self.open_count >= limit:
            self.waiters.append((self.loop.time() + self.connect_timeout, waiter))
            return None
        self._connect(waiter)
        return None

    def cancel_wait(self, waiter: Waiter) -> None:
        for i, (_, w) in enumerate(self.waiters):
            if w == waiter:  # ==: a bound method is a new object at every access
                del self.waiters[i]
                return

    def _connect(self, waiter: Waiter) -> None:
        task = self.loop.create_task(self._open(waiter))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def _open(self, waiter: Waiter) -> None:
        upstream = self.upstream
        conn = UpstreamConnection(self)
        try:
            async with asyncio.timeout(self.connect_timeout):
                # A native class (compiled) cannot subclass asyncio.Protocol: the loop only
                # calls the connection's methods.
                protocol = cast(asyncio.Protocol, conn)
                await self.loop.create_connection(lambda: protocol, upstream.host, upstream.port)
        except TimeoutError:
            waiter(None, Outcome.CONNECT_FAILED, f"upstream {upstream.address}: connect timeout")
            return
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            waiter(None, Outcome.CONNECT_FAILED, f"upstream {upstream.address}: {reason.lower()}")
            return
        self.opened += 1
        if self.closed:
            conn.close()
            waiter(None, Outcome.CONNECT_FAILED, f"upstream {upstream.address}: pool closed")
            return
        self.busy.add(conn)
        waiter(conn, Outcome.OK, "")

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """An exchange ended cleanly on ``conn``: reuse it, park it or close it."""
        self.busy.discard(conn)
        if not reusable or self.closed or conn.closed:
            conn.close()
            self._serve_waiter()
            return
        if self.waiters:
            _, waiter = self.waiters.popleft()
            self.busy.add(conn)
            waiter(conn, Outcome.OK, "")
            return
        if not self.keepalive:
            conn.close()
            return
        # Parked even above ``keepalive``: the sweep trims the surplus once it has stayed idle
        # for TRIM_AFTER. nginx closes it at once, which under bursty load means closing
        # connections that the next burst has to open again.
        conn.idle_since = self.time()
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """``conn`` closed (either side): it leaves the pool, making room for a waiter."""
        self.busy.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        self._serve_waiter()

    def _serve_waiter(self) -> None:
        limit = self.max_connections
        if self.waiters and not self.closed and (not limit or self.open_count < limit):
            _, waiter = self.waiters.popleft()
            self._connect(waiter)

    def sweep(self, now: float) -> None:
        """Expire deadlines: exchanges past their read or total timeout, idle connections past
        the idle timeout, waiters past the connect timeout."""
        for conn in list(self.busy):
            deadline = conn.deadline
            total = conn.total_deadline
            if (deadline is not None and now >= deadline) or (total is not None and now >= total):
                conn.on_deadline(now)
        idle = self.idle
        idle_timeout = self.idle_timeout
        if idle and now - idle[0].idle_since >= idle_timeout:
            for conn in [c for c in idle if now - c.idle_since >= idle_timeout]:
                idle.remove(conn)
                conn.close()
        # Beyond ``keepalive``, the connections idle longest go (the list is oldest first).
        while len(idle) > self.keepalive and now - idle[0].idle_since >= TRIM_AFTER:
            idle.pop(0).close()
        while self.waiters and now >= self.waiters[0][0]:
            _, waiter = self.waiters.popleft()
            waiter(None, Outcome.CANCELLED, f"upstream {self.upstream.address}: no connection free")

    def close(self) -> None:
        """Close idle connections now and busy ones as their exchanges end (a reload)."""
        self.closed = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()
        while self.waiters:
            _, waiter = self.waiters.popleft()
            waiter(None, Outcome.CANCELLED, f"upstream {self.upstream.address}: pool closed")

    def abort(self) -> None:
        """Close everything now (shutdown after the drain)."""
        self.close()
        for conn in list(self.busy):
            conn.close()
        for task in list(self.connecting):
            task.cancel()
