"""What all connections of one server share: the handler and the hooks around it, the limits,
request ids, the response heads, the clock that expires deadlines, the connection cap and the
graceful drain. One per listening server (http/server.py makes it); each connection
(http/protocol.py) holds it."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from webtorch.http.limits import Limits
from webtorch.http.messages import Handler, Request, Response
from webtorch.http.router import Route
from webtorch.http.serialise import HeadCache

if TYPE_CHECKING:  # connection.py holds a ServerState: the import runs the other way
    from webtorch.http.connection import Slot

log: Final = logging.getLogger("webtorch.http")

# Observer of finished requests: (request, status, seconds from last byte in to response ready).
Observer = Callable[[Request, int, float], None]
# The access log's hook: (request, status, body bytes sent, seconds from the request's arrival to
# its response ready, or for a streamed body to its last byte). Called once per request answered,
# and for requests refused while parsing (with what is known of them).
AccessLogger = Callable[[Request, int, int, float], None]
# Raises the HTTPError that would refuse a request, seen before its body is read (a client
# waiting for 100 Continue): Router.precheck.
ExpectCheck = Callable[[Request], None]
# The route of a path if its requests are dispatched as soon as their headers are in, the body
# following as a stream (proxied routes); None for routes that want the whole body first.
StreamMatch = Callable[[str], Route | None]
# Takes a WebSocket upgrade request (streams/): given the request, its transport, the bytes read
# after it and what to call when the connection ends, True when it took the transport over,
# a Response that refuses it, or False to leave it to the handler as plain HTTP.
UpgradeHook = Callable[[Request, asyncio.Transport, bytes, Callable[[], None]], Response | bool]

# Seconds between two log lines about the connection cap (each counts what happened since).
_CAP_LOG_INTERVAL: Final = 60.0
_HEX_BYTES: Final = [b"%02x" % n for n in range(256)]


class ConnectionGate(Protocol):
    """Who may connect: asked once per connection, told when an admitted one ends."""

    def admit(self, address: str) -> bool: ...

    def release(self, address: str) -> None: ...


class OpenConnection(Protocol):
    """An open connection (HttpProtocol) as the state and its readers see it: what they ask of
    it is asked rarely (never per request), so by name."""

    # The loop's time by which the connection must next make progress (None: none owed).
    deadline: float | None
    serial: int  # its place in accept order
    transport: asyncio.Transport | None
    slots: deque[Slot]  # the requests in flight, in arrival order

    def idle(self) -> bool: ...

    def reclaim(self) -> None: ...

    def on_deadline(self) -> None: ...

    def drain(self) -> None: ...


class ServerState:
    """What all connections of one server share: handler, limits, open connections, the clock."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits | None = None,
        observer: Observer | None = None,
        server_name: bytes = b"webtorch",
        stream_match: StreamMatch | None = None,
        scheme: str = "http",
        access_log: AccessLogger | None = None,
        request_ids: bool = False,
    ) -> None:
        self.handler = handler
        self.limits = limits or Limits()
        self.observer = observer
        self.access_log = access_log
        self.request_ids = request_ids
        # Asked before a 100 Continue goes out; None: every request gets one.
        self.expect_check: ExpectCheck | None = None
        # Generated request ids: 16 random hex digits per server, then a 16-digit counter. 32 hex
        # digits, as nginx's $request_id and a W3C trace id; unique across restarts and workers
        # without a random draw per request.
        self._id_prefix = os.urandom(8).hex().encode()
        self._id_count = 0
        # The id's first 28 hex digits (prefix and the counter's high digits), remade once every
        # 256 ids: the last two digits come from a table, so an id costs one concatenation
        # instead of a %x formatting (which mypyc cannot compile: 0.15 us per request).
        self._id_high = b""
        self.stream_match = stream_match
        self.upgrade: UpgradeHook | None = None  # None: WebSocket upgrades are plain HTTP
        self.scheme = scheme
        # Response heads, remade with Date on each tick; connections bind this one object.
        self.heads = HeadCache(server_name)
        self.connections: set[OpenConnection] = set()
        # Told the body bytes of each response once they are sent (the metrics' byte counts).
        self.sent_observer: Callable[[Request, int], None] | None = None
        # Admits or refuses each new connection by its address (the guard's); None: all admitted.
        self.gate: ConnectionGate | None = None
        self.accepted = 0  # connections ever accepted (the metrics' counter)
        # Client connections open at once: limits.max_connections, which HttpServer lowers to
        # what the file descriptor limit leaves room for. Running out of descriptors locks
        # every client out (issue 19: 1,500 idle sockets did, silently); this cap bites first.
        self.max_connections = self.limits.max_connections
        self.reclaimed = 0  # idle connections closed at the cap to make room (ever)
        self.refused = 0  # connections refused at the cap (ever)
        self._cap_counts = [0, 0]  # reclaimed, refused: since the cap's last log line
        self._cap_log_at = 0.0  # the loop's time before which that line waits
        self.draining = False
        self._all_closed: asyncio.Event | None = None

    def tick(self, now: float | None = None) -> None:
        """Refresh the cached Date header and expire deadlines; called about once a second."""
        self.heads.refresh()
        if now is None:
            return
        for conn in list(self.connections):
            if conn.deadline is not None and now >= conn.deadline:
                conn.on_deadline()

    def new_request_id(self) -> bytes:
        count = self._id_count = self._id_count + 1
        low = count & 0xFF
        if low == 0 or not self._id_high:
            self._id_high = b"%s%014x" % (self._id_prefix, count >> 8)
        return b"%s%s" % (self._id_high, _HEX_BYTES[low])

    def make_room(self, now: float) -> bool:
        """At the connection cap: close the idle connection nearest its timeout (the one that
        would go first anyway), so that a new one fits; False when none is idle. nginx reuses
        idle keep-alive connections the same way when worker_connections run out. Scans the
        connections, but only at the cap, never per request."""
        victim: OpenConnection | None = None
        nearest = (0.0, 0)
        for conn in self.connections:
            deadline = conn.deadline
            if deadline is not None and conn.idle():
                # The older connection first among equal deadlines (uvloop's clock counts ms).
                key = (deadline, conn.serial)
                if victim is None or key < nearest:
                    victim, nearest = conn, key
        counts = self._cap_counts
        if victim is not None:
            victim.reclaim()
            self.connections.discard(victim)  # now, not when the loop reports it closed
            self.reclaimed += 1
            counts[0] += 1
        else:
            self.refused += 1
            counts[1] += 1
        if now >= self._cap_log_at:
            self._cap_log_at = now + _CAP_LOG_INTERVAL
            log.warning(
                "connection cap reached: %d open (server.limits.max_connections, lowered to "
                "what ulimit -n allows); since the last report, %d idle connection(s) closed "
                "for new ones, %d new one(s) refused with 503",
                self.max_connections,
                counts[0],
                counts[1],
            )
            counts[0] = counts[1] = 0
        return victim is not None

    def connection_lost(self, conn: OpenConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    def start_draining(self) -> None:
        """Graceful shutdown: idle connections close now, busy ones after their last response."""
        self.draining = True
        self._all_closed = asyncio.Event()
        if not self.connections:
            self._all_closed.set()
        for conn in list(self.connections):
            conn.drain()

    async def wait_closed(self) -> None:
        if self._all_closed is not None:
            await self._all_closed.wait()
