"""Flow control: when a connection reads. Reading pauses while the transport's write buffer is
full (the client is not reading), while too many pipelined requests await answers, or while a
streamed request body's consumer lags, and resumes when all clear; input read before a pause
waits, parsed later, and the socket is not read meanwhile. A connection that is done closes
lingering (half-closed, input discarded for a moment) so that its last answer arrives."""

from __future__ import annotations

import asyncio
from typing import Final

from webtorch.http.connection import BODY, HEADERS, WAIT, Connection
from webtorch.http.state import ServerState

_SLICE: Final = 16384  # bytes parsed between two checks of whether reading should pause


class Flow(Connection):
    """A connection's reading (see http/connection.py for the layers)."""

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(state, loop)
        self._socket_paused = False
        self._resume: asyncio.Handle | None = None  # parsing held input, scheduled
        # The protocol that took the transport over (a WebSocket: HttpProtocol._switch): the
        # rest of a read that held the upgrade request is its.
        self._successor: asyncio.Protocol | None = None

    def _feed(self, data: bytes) -> None:
        """Parse ``data`` (the parser's layer: HttpProtocol)."""
        raise NotImplementedError

    def data_received(self, data: bytes) -> None:
        if self.closing and self.phase not in (HEADERS, BODY):
            # Closing: no new request is read, but one already being received (when a graceful
            # drain began) is read to its end and answered.
            return
        if self._unparsed:
            # Not expected: the socket stays paused while held input waits (_update_reading).
            # Should a transport deliver anyway, nothing is lost or reordered.
            data = self._unparsed[self._unparsed_at :] + data
            self._unparsed = b""
            self._unparsed_at = 0
        if len(data) > _SLICE:
            self._feed_slices(data, 0)
        else:
            self._feed(data)

    def _feed_slices(self, data: bytes, pos: int) -> None:
        """Parse a large read from ``pos`` a slice at a time. pause_reading() only stops *future*
        reads, and a read can hold hundreds of pipelined requests: checking between slices makes
        a pause (client not reading, too many answers pending) take effect within the read. The
        rest waits in ``_unparsed`` (the read itself and an offset: no copy) until parsing
        resumes; the socket is not read meanwhile, so what a connection holds stays one read,
        and each byte is copied once (a slice), however many pauses it waits through."""
        end = len(data)
        while pos < end:
            if self.read_paused:
                self._unparsed = data
                self._unparsed_at = pos
                return
            if self.closing and self.phase not in (HEADERS, BODY):
                return
            self._feed(data[pos : pos + _SLICE])
            pos += _SLICE
            if self._successor is not None:
                if pos < end:
                    self._successor.data_received(data[pos:])
                return

    def _feed_unparsed(self) -> None:
        self._resume = None
        data, pos = self._unparsed, self._unparsed_at
        if not data or self.read_paused or self.transport is None:
            return
        self._unparsed = b""
        self._unparsed_at = 0
        self._feed_slices(data, pos)
        if not self._unparsed:
            self._update_reading()  # all of it parsed: the socket may be read again

    def pause_writing(self) -> None:
        self.write_paused = True
        streaming = self._streaming
        if streaming is not None and streaming.response is not None:
            # The client stopped reading a streamed body: stop its source too, and give the
            # client as long as a body may take to read again (a slow-read attack ends there).
            assert streaming.response.stream is not None
            streaming.response.stream.pause()
            self.deadline = self._time() + self.limits.body_timeout
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        streaming = self._streaming
        if streaming is not None and streaming.response is not None:
            assert streaming.response.stream is not None
            self.deadline = None
            streaming.response.stream.resume()
        self._update_reading()

    def _set_body_paused(self, paused: bool) -> None:
        if paused == self.body_paused:
            return
        self.body_paused = paused
        if self.phase == BODY:
            # Waiting for the consumer is not the client's delay: no body deadline meanwhile.
            self.deadline = None if paused else self._time() + self.limits.body_timeout
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None:
            return
        pause = self.write_paused or self.body_paused or len(self.slots) >= self.limits.max_pipeline
        self.read_paused = pause
        # The socket is read only once held input is parsed: resuming it at once would let a
        # client that pipelines without end grow what is held by a read per pause (issue 19:
        # 44-77 MB per connection, and a copy of it all on each resume).
        unparsed = bool(self._unparsed)
        socket_pause = pause or unparsed
        if socket_pause != self._socket_paused:
            self._socket_paused = socket_pause
            if socket_pause:
                transport.pause_reading()
            else:
                transport.resume_reading()
        if not pause and unparsed and self._resume is None:
            # Not now: this may run inside a parser callback, and the parser is not reentrant.
            self._resume = self.loop.call_soon(self._feed_unparsed)

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close after the last response. Half-close first when possible and keep discarding input
        for a moment (nginx's lingering close): closing a socket with unread request bytes sends
        a RST that can destroy the response (a 413 for an upload) before the client reads it."""
        if self._peer_eof:
            transport.close()  # both sides are done: nothing left to linger for
        elif transport.can_write_eof():
            transport.write_eof()
            self.phase = WAIT
            self.deadline = self._time() + 2.0
            self._update_reading()
        else:
            transport.close()
