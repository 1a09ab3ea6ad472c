"""Every open WebSocket connection of a server (model streams and proxied tunnels): their cap,
the once-a-second sweep of their deadlines, and the drain on shutdown (close 1001 to each, wait
for the close handshakes, then drop what is left)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from webtorch.config import StreamsConfig


class Open(Protocol):
    """An open connection as the hub sees it (streams/websocket.py, streams/tunnel.py)."""

    def on_tick(self, now: float) -> None: ...

    def close(self, code: int = 1000, reason: str = "") -> None: ...

    def abort(self) -> None: ...


class Hub:
    def __init__(self, settings: StreamsConfig, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self.open: set[Open] = set()
        self.accepted = 0  # ever
        self.refused = 0  # upgrades refused at the cap (ever)
        self.draining = False
        self._all_closed: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Told the time on each tick too (the stream store's expiry).
        self.sweepers: list[Callable[[float], None]] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sweep the deadlines once a second (no timer per connection or message)."""

        def tick() -> None:
            self.tick(self.clock())
            self._timer = loop.call_later(1.0, tick)

        self._timer = loop.call_later(1.0, tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def full(self) -> bool:
        return len(self.open) >= self.settings.max_connections

    def opened(self, conn: Open) -> None:
        self.open.add(conn)
        self.accepted += 1
        if self.draining:
            conn.close(1001, "server shutting down")

    def forget(self, conn: Open) -> bool:
        """``conn`` ended; False when it had already (what it does at its end happens once)."""
        if conn not in self.open:
            return False
        self.open.discard(conn)
        if not self.open and self._all_closed is not None:
            self._all_closed.set()
        return True

    def tick(self, now: float) -> None:
        for conn in list(self.open):
            conn.on_tick(now)
        for sweep in self.sweepers:
            sweep(now)

    async def drain(self, grace: float) -> None:
        """Close every connection with 1001 (going away), wait up to ``grace`` seconds for their
        close handshakes, then drop the rest."""
        self.draining = True
        self._all_closed = asyncio.Event()
        if not self.open:
            return
        for conn in list(self.open):
            conn.close(1001, "server shutting down")
        try:
            await asyncio.wait_for(self._all_closed.wait(), grace)
        except TimeoutError:
            for conn in list(self.open):
                conn.abort()
