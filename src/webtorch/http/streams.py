"""Streamed response bodies: a response whose body comes from a source (a proxied download)
gets its head written, then a :class:`Sink` that its source writes into until the body ends or
breaks off. The body is framed by its Content-Length when known, else chunked, else (an
HTTP/1.0 client) by closing. Later responses wait for it to end (http/delivery.py)."""

from __future__ import annotations

import asyncio
from typing import Final

from webtorch.http.connection import Slot
from webtorch.http.delivery import Delivery
from webtorch.http.messages import Response
from webtorch.http.serialise import LAST_CHUNK, NO_BODY_STATUSES, chunk, content_length, head_lines
from webtorch.http.state import ServerState

_CHUNKED: Final = b"transfer-encoding: chunked\r\n"


class Sink:
    """Hands a streamed response body to its connection until the body ends or fails; calls
    after that (a source that has not noticed yet) are dropped."""

    __slots__ = ("chunked", "discard", "keep_alive", "protocol", "sent", "slot")

    def __init__(
        self, protocol: Streams, chunked: bool, keep_alive: bool, discard: bool, slot: Slot
    ) -> None:
        self.protocol: Streams | None = protocol
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.discard = discard  # a HEAD request or a status without a body
        self.slot = slot
        self.sent = 0  # body bytes written (the access log's)

    def write(self, data: bytes) -> None:
        protocol = self.protocol
        if protocol is None or self.discard or not data:
            return
        transport = protocol.transport
        if transport is None:
            return
        self.sent += len(data)
        if self.chunked:
            transport.write(chunk(data))
        else:
            transport.write(data)

    def end(self) -> None:
        protocol = self.protocol
        if protocol is not None:
            self.protocol = None
            protocol.stream_ended(self)

    def abort(self) -> None:
        protocol = self.protocol
        if protocol is not None:
            self.protocol = None
            protocol.stream_aborted(self)


class Streams(Delivery):
    """A connection's streamed response body, one at a time (see http/connection.py)."""

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(state, loop)
        self._sink: Sink | None = None  # the sink of the body being streamed (_streaming's)

    def _start_stream(
        self, transport: asyncio.Transport, response: Response, slot: Slot, keep_alive: bool
    ) -> None:
        """Write a streamed response's head and start its body. The body is framed by its
        Content-Length when known, else chunked, else (an HTTP/1.0 client) by closing."""
        status = response.status
        discard = slot.head or status in NO_BODY_STATUSES
        http10 = slot.request is not None and slot.request.http_version == "1.0"
        chunked = response.content_length is None and not discard and not http10
        if response.content_length is None and not discard and http10:
            keep_alive = False
        framing = b""
        if response.content_length is not None and status not in NO_BODY_STATUSES:
            framing = content_length(response.content_length)
        elif chunked:
            framing = _CHUNKED
        head = head_lines(self._heads, response, slot.request, framing, keep_alive)
        transport.write(b"".join(head))
        self._streaming = slot
        sink = self._sink = Sink(self, chunked, keep_alive, discard, slot)
        assert response.stream is not None
        response.stream.start(sink)
        if self.write_paused and self._sink is sink:
            response.stream.pause()

    def stream_ended(self, sink: Sink) -> None:
        """A streamed body is complete: finish its framing, go on with the next response."""
        self._streaming = None
        self._sink = None
        if self.state.access_log is not None or self.state.sent_observer is not None:
            self._log_stream(sink)
        transport = self.transport
        if transport is None:
            return
        if sink.chunked:
            transport.write(LAST_CHUNK)
        if self.write_paused:
            self.deadline = None
        if not sink.keep_alive:
            self.closing = True
            self.slots.clear()
            self._linger(transport)
            return
        self._flush()

    def stream_aborted(self, sink: Sink) -> None:
        """A streamed body broke off: close, so the client sees the truncation (a short
        Content-Length body, or no last chunk) instead of a complete-looking response."""
        self._streaming = None
        self._sink = None
        if self.state.access_log is not None or self.state.sent_observer is not None:
            self._log_stream(sink)
        self.closing = True
        self.slots.clear()
        if self.transport is not None:
            self.transport.close()

    def _stop_stream(self) -> None:
        """The client went away while a body was streaming: count what went out, stop the
        source."""
        streaming = self._streaming
        if streaming is None:
            return
        response = streaming.response
        self._streaming = None
        sink = self._sink
        if sink is not None:
            sink.protocol = None
            if self.state.access_log is not None or self.state.sent_observer is not None:
                self._log_stream(sink)  # cut short: the bytes that went out
            self._sink = None
        if response is not None and response.stream is not None:
            response.stream.cancel()

    def _log_stream(self, sink: Sink) -> None:
        response = sink.slot.response
        if response is not None:
            sent_observer = self.state.sent_observer
            if sent_observer is not None and sink.slot.request is not None:
                sent_observer(sink.slot.request, sink.sent)
            self._log(sink.slot, response.status, sink.sent)
