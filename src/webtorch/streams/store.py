"""The per-stream state WebTorch keeps (sans-IO, a fake clock in tests): each stream's recurrent
state or window of recent items, bounded in count and bytes, kept a while after its connection
ends (a client that reconnects with its stream id resumes it), then expired."""

from __future__ import annotations

from typing import Final

import numpy as np

# A stream id as a client may give it: short, and safe in a log line and a JSON answer.
MAX_ID: Final = 64


class Full(Exception):
    """No room for another stream (count or bytes); the message says which bound."""


class InUse(Exception):
    """The stream is open on another connection."""


class StreamState:
    """One stream's state: ``state`` (a recurrent model's) or ``window`` (the last K items, in
    a ring: ``count`` items seen, the oldest at ``count % K`` once it is full)."""

    __slots__ = ("attached", "count", "key", "last_used", "nbytes", "state", "window")

    def __init__(self, key: tuple[str, str], state: np.ndarray | None, window: np.ndarray | None):
        self.key = key
        self.state = state
        self.window = window
        self.count = 0
        self.attached = False
        self.last_used = 0.0
        self.nbytes = (0 if state is None else state.nbytes) + (
            0 if window is None else window.nbytes
        )

    def push(self, item: np.ndarray) -> None:
        """Add ``item`` to the window (the oldest one drops out once it is full)."""
        assert self.window is not None
        self.window[self.count % len(self.window)] = item
        self.count += 1

    def recent(self) -> np.ndarray:
        """The window in arrival order, oldest first (a copy)."""
        assert self.window is not None
        k = len(self.window)
        at = self.count % k
        return np.concatenate((self.window[at:], self.window[:at])) if at else self.window.copy()


class StreamStore:
    """Every model's streams, keyed by (model, stream id)."""

    def __init__(self, max_streams: int, max_bytes: int, expiry: float) -> None:
        self.max_streams = max_streams
        self.max_bytes = max_bytes
        self.expiry = expiry
        self.streams: dict[tuple[str, str], StreamState] = {}
        self.bytes = 0
        self.expired = 0  # streams dropped after expiry (ever)
        self.refused = 0  # new streams refused at a bound (ever)

    @property
    def attached(self) -> int:
        return sum(1 for s in self.streams.values() if s.attached)

    def attach(self, fresh: StreamState, now: float) -> StreamState:
        """The stream ``fresh.key`` for a connection: the stored one (resumed), or ``fresh``
        when there is none and room for it. Raises Full or InUse."""
        stored = self.streams.get(fresh.key)
        if stored is not None:
            if stored.attached:
                raise InUse(f"stream {fresh.key[1]!r} is open on another connection")
            stored.attached = True
            return stored
        if len(self.streams) >= self.max_streams or self.bytes + fresh.nbytes > self.max_bytes:
            self.sweep(now)  # room that expiry owes first
        if len(self.streams) >= self.max_streams:
            self.refused += 1
            raise Full(f"too many streams (streams.max_streams = {self.max_streams})")
        if self.bytes + fresh.nbytes > self.max_bytes:
            self.refused += 1
            raise Full(f"stream state memory is full (streams.max_state_bytes = {self.max_bytes})")
        fresh.attached = True
        fresh.last_used = now
        self.streams[fresh.key] = fresh
        self.bytes += fresh.nbytes
        return fresh

    def detach(self, stream: StreamState, now: float) -> None:
        """Its connection ended: kept for ``expiry`` seconds from now."""
        stream.attached = False
        stream.last_used = now

    def sweep(self, now: float) -> None:
        """Drop the detached streams unused for ``expiry`` seconds."""
        expiry = self.expiry
        gone = [
            key for key, s in self.streams.items() if not s.attached and now - s.last_used >= expiry
        ]
        for key in gone:
            self.bytes -= self.streams.pop(key).nbytes
        self.expired += len(gone)
