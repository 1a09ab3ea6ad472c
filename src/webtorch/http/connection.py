"""One client connection's state: the base of the layers that make up :class:`HttpProtocol`.

A connection is built as a stack of classes, one module each, every layer subclassing the one
below and using its fields:

- ``connection.py`` (here) -- what every layer reads: the transport, the phase of the request
  being received, the deadline, the slots of the requests in flight; idle, reclaim, drain;
- ``flow.py`` -- when the connection reads: input to the parser a slice at a time, pauses, held
  input, lingering close;
- ``delivery.py`` -- requests dispatched and answered in arrival order, responses written;
- ``streams.py`` -- streamed response bodies;
- ``protocol.py`` -- the asyncio Protocol and httptools' callbacks: bytes in, requests out.

Layers, not separate objects, because the request path crosses all of them for every request:
mypyc compiles the stack into one C struct, so a layer reads another's field at the cost of a
field read, where an object per concern would add an allocation per connection and a pointer
hop per access. A layer calls down directly; the two calls up (parse what was read, start a
streamed body) are methods that the layer above overrides.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final

from webtorch.http.messages import Pending, Request, Response
from webtorch.http.state import ServerState

# The phase of the request being received.
IDLE: Final = 0  # between requests
HEADERS: Final = 1  # its head is arriving
BODY: Final = 2  # its body is arriving
WAIT: Final = 3  # received; reading waits for the next one (or for a lingering close)


class Slot:
    """One request's place in the connection's response order."""

    __slots__ = (
        "expect_continue",
        "head",
        "keep_alive",
        "pending",
        "request",
        "response",
        "started",
    )

    def __init__(self, head: bool, keep_alive: bool, started: float) -> None:
        self.head = head  # a HEAD request: its response has no body
        self.keep_alive = keep_alive
        self.started = started
        self.response: Response | None = None
        self.request: Request | None = None
        self.pending: Pending | None = None
        self.expect_continue = False  # a 100 Continue is owed once the slot's turn comes


def abandon(slot: Slot) -> None:
    """The slot's response will never be written: stop the work behind it."""
    if slot.pending is not None:
        slot.pending.cancel()
    response = slot.response
    if response is not None and response.stream is not None:
        response.stream.cancel()


def _unconnected(data: bytes) -> None:
    raise RuntimeError("no transport yet")


class Connection:
    """One client connection's state (see the module's docstring for its layers)."""

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.state = state
        self.limits = state.limits
        self.loop = loop or asyncio.get_event_loop()
        # Bound once: per request, calling it saves a method lookup on the (uvloop) loop.
        self._time: Callable[[], float] = self.loop.time
        self.transport: asyncio.Transport | None = None
        # The transport's write, bound once (compiled code looks a method of a non-native
        # object up by name on every call).
        self._send: Callable[[bytes], None] = _unconnected
        self.client = ""
        self.serial = 0  # the connection's place in accept order (see ServerState.make_room)
        # The loop's time by which the client must next make progress (send the rest of a
        # request, or a new one); None while the server owes the next step. Swept by the
        # state's once-a-second tick, so the hot path never arms or cancels timers.
        self.deadline: float | None = None
        self.phase = IDLE
        self.slots: deque[Slot] = deque()
        self.closing = False  # no more requests are read; close after the last response
        # Parsing is paused: the client is not reading its answers, too many requests await
        # theirs, or a streamed body's consumer lags. The socket is paused meanwhile, and
        # also while input already read waits in _unparsed (see Flow._update_reading).
        self.read_paused = False
        self.write_paused = False
        self.body_paused = False  # a streamed request body's consumer is not keeping up
        # The response whose body is being streamed: later responses wait for it to end.
        self._streaming: Slot | None = None
        # Input held back while parsing is paused: a read, and how far into it parsing got
        # (an offset, so that resuming copies nothing: see Flow._feed_slices).
        self._unparsed = b""
        self._unparsed_at = 0
        self._peer_eof = False  # the client half-closed

    def idle(self) -> bool:
        """Waiting for a request with nothing owed (kept alive, or new and silent so far):
        closing it loses no work."""
        return (
            self.phase == IDLE
            and not self.slots
            and not self.closing
            and self._streaming is None
            and not self._unparsed
            and self.transport is not None
        )

    def reclaim(self) -> None:
        """Closed to make room for a new connection (the cap: see ServerState.make_room)."""
        self.closing = True
        self.deadline = None
        if self.transport is not None:
            self.transport.close()

    def drain(self) -> None:
        """Stop taking new requests; close once the responses in flight are written."""
        self.closing = True
        if self.phase == IDLE and not self.slots and self.transport is not None:
            self.transport.close()
