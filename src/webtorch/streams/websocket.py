"""One WebSocket connection (RFC 6455) after its upgrade: the asyncio Protocol over wsproto's
sans-IO connection. wsproto does the framing (masking, fragmentation, control frames, UTF-8,
close codes); this shell adds what a server must bound: the size of a frame and of a message,
silence (ping, then close), a client that does not read (reading pauses above the write
buffer's high-water mark), a peer that never answers our close, and the drain.

Deadlines are plain floats swept by the hub's once-a-second tick (streams/hub.py), as the HTTP
connections' are, so that no message arms or cancels a timer.

One shortcut, for speed (benchmarks/streams.py): wsproto's Python per frame (a generator, a
buffer object, a masker, an incremental UTF-8 decoder and two dataclasses per frame) was the
largest share of a stream item's cost, with one small message per item. So while the connection
is OPEN and no extension is in use, this shell cuts the input into whole frames itself (the
header says how long each is) and takes the commonest frame, a whole data message (FIN set,
opcode text or binary, masked, no RSV bit, no fragmented message in progress, text that is valid
UTF-8) straight to the handler; every other frame (control frames, fragments, anything wsproto
would refuse) is fed to wsproto whole, which answers or closes as before. wsproto thus only ever
holds whole frames, and the two paths cannot disagree on where a frame starts. Once the
connection leaves OPEN (either side closes), wsproto gets the rest of the input as it comes.
Messages out are framed here too while OPEN (a server frame is a header and the bytes: wsproto
would only add its per-call overhead; it keeps no state for unfragmented messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, cast

from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

if TYPE_CHECKING:
    from webtorch.streams.hub import Hub

log: Final = logging.getLogger("webtorch.streams")

GOING_AWAY: Final = 1001  # idle, or the server drains
TOO_BIG: Final = 1009
INTERNAL: Final = 1011  # a bug of ours, or the keep-alive ping went unanswered
TRY_LATER: Final = 1013


class Handler(Protocol):
    """What a WebSocket serves: told of each whole message and of the end."""

    def message(self, ws: WebSocket, data: str | bytes) -> None: ...

    def closed(self, ws: WebSocket, code: int) -> None: ...


class WebSocket(asyncio.Protocol):
    """A WebSocket connection: wsproto's state machine on a transport."""

    def __init__(self, hub: Hub, conn: Connection, handler: Handler, release: Callable[[], None]):
        self.hub = hub
        self.conn = conn
        self.handler = handler
        self._release = release  # the connection gate's (the guard's), told when this ends
        self.settings = hub.settings
        self.transport: asyncio.Transport | None = None
        self._clock = hub.clock
        now = self._clock()
        self.last_input = now  # any bytes: a pong counts (keep-alive)
        self.last_message = now  # a data message (idle timeout)
        self.ping_sent: float | None = None  # when the unanswered ping went out
        self.close_sent: float | None = None  # when our close frame went out
        self.code: int | None = None  # the close code, once closing
        self._parts: list[str | bytes] = []  # the fragments of the message being received
        self._message_size = 0
        self._frame_size = 0
        self.write_paused = False
        self.held = False  # the handler asked to stop reading (its queue is full)
        self._reading = True
        self._pump_soon: asyncio.Handle | None = None
        self.received = 0  # bytes in, for the metrics
        self.sent = 0
        # Frames cut here while OPEN with no extension (the module's docstring): the input not
        # yet handled, starting at a frame's first byte; whether a fragmented message is in
        # progress (its frames go to wsproto, which keeps track of it).
        self.split = True
        self._inbox = bytearray()
        self._continuing = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self.settings.write_buffer)
        # The HTTP connection may have paused reading before it handed the socket over.
        self.transport.resume_reading()
        self.hub.opened(self)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.last_input = self._clock()
        if self.split:
            inbox = self._inbox
            if inbox:  # a frame's start waits there: the bytes go on after it
                inbox += data
                self._pump(inbox)
            else:  # the usual: whole frames, read in place (no copy)
                self._pump(data)
            return
        try:
            self.conn.receive_data(data)
        except LocalProtocolError:  # bytes after the close handshake: nothing to do with them
            return
        self._pump()

    def eof_received(self) -> bool | None:
        if self.conn.state is not ConnectionState.CLOSED:
            self._gone(1006)  # no close frame before the FIN (RFC 6455 7.1.5)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._gone(1006 if self.code is None else self.code)
        if self._pump_soon is not None:
            self._pump_soon.cancel()
            self._pump_soon = None

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()

    # -- what the handler calls ---------------------------------------------------------------

    def send(self, data: str | bytes) -> None:
        """Send one message (str: text, bytes: binary); dropped once closing."""
        if self.transport is None or self.conn.state is not ConnectionState.OPEN:
            return
        if self.split:
            if isinstance(data, str):
                self._write(_server_frame(0x81, data.encode()))
            else:
                self._write(_server_frame(0x82, data))
            return
        event: Event = TextMessage(data) if isinstance(data, str) else BytesMessage(data)
        self._write(self.conn.send(event))

    def hold(self, held: bool) -> None:
        """Stop (True) or resume reading messages: the handler's queue is full, or no more."""
        if held != self.held:
            self.held = held
            self._update_reading()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake; the transport closes when the peer answers, or after
        close_timeout."""
        if self.transport is None or self.conn.state is not ConnectionState.OPEN:
            return
        self.code = code
        self._write(self.conn.send(CloseConnection(code, reason)))
        self.close_sent = self._clock()
        self._update_reading()  # read on: the peer's close frame is what we wait for

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- inside -------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.sent += len(data)
        assert self.transport is not None
        self.transport.write(data)

    def _pump(self, data: bytes | bytearray | None = None) -> None:
        """Handle the events wsproto has parsed, until the handler holds the connection: what
        it did not take stays in wsproto's buffer (one read at most, the socket being paused)."""
        self._pump_soon = None
        try:
            if self.split:
                self._frames(self._inbox if data is None else data)
                if self.split:
                    return
            for event in self.conn.events():
                self._event(event)
                if self.transport is None or (self.held and self.close_sent is None):
                    break
        except Exception:  # a bug of ours: this connection ends, the server goes on
            log.exception("WebSocket handling failed")
            self._fail(INTERNAL, "internal error")

    def _frames(self, buf: bytes | bytearray) -> None:
        """The whole frames in ``buf`` (the inbox, or a read when the inbox is empty), in
        order: whole data messages to the handler, the others through wsproto; until the
        handler holds the connection, or the connection leaves OPEN (then wsproto takes the rest
        of the input, and this is not called again). What is left waits in the inbox."""
        at = 0
        end = len(buf)
        conn = self.conn
        settings = self.settings
        opened = conn.state is ConnectionState.OPEN  # changed only by frames wsproto takes
        try:
            while True:
                transport = self.transport
                if transport is None or transport.is_closing():
                    return  # gone, or failed: its input is dropped
                if not opened or self.close_sent is not None:
                    # Closing (held or not: the peer's close frame is what we wait for).
                    self.split = False
                    rest = bytes(buf[at:])
                    at = end
                    if rest:
                        with contextlib.suppress(LocalProtocolError):  # after the close handshake
                            conn.receive_data(rest)
                    return
                if self.held or end - at < 2:
                    return  # held (the rest waits in the inbox), or no whole header yet
                b0, b1 = buf[at], buf[at + 1]
                n = b1 & 0x7F
                head = 2
                if n == 126:
                    if end - at < 4:
                        return
                    n = (buf[at + 2] << 8) | buf[at + 3]
                    head = 4
                elif n == 127:
                    if end - at < 10:
                        return
                    (n,) = struct.unpack_from("!Q", buf, at + 2)
                    head = 10
                if n > settings.max_frame:
                    # Refused at its header: the frame is not buffered to find out.
                    self._fail(TOO_BIG, f"frame larger than {settings.max_frame} bytes")
                    return
                if b1 & 0x80:
                    head += 4
                stop = at + head + n
                if stop > end:
                    return
                opcode = b0 & 0x0F
                if b0 & 0xF0 == 0x80 and b1 & 0x80 and 0 < opcode < 3 and not self._continuing:
                    # A whole, final, masked data frame without RSV bits: a whole message.
                    payload = _unmask(buf[at + head - 4 : at + head], buf[at + head : stop])
                    if opcode == 1:
                        try:
                            text = payload.decode()
                        except UnicodeDecodeError:
                            pass  # wsproto closes with 1007
                        else:
                            at = stop
                            self._whole(text, n)
                            continue
                    else:
                        at = stop
                        self._whole(payload, n)
                        continue
                elif opcode < 3:  # a data frame of a fragmented message, or a bad one
                    self._continuing = not b0 & 0x80
                frame = bytes(buf[at:stop])
                at = stop
                conn.receive_data(frame)
                for event in conn.events():  # one frame: one event at most
                    self._event(event)
                opened = conn.state is ConnectionState.OPEN
        finally:
            if buf is self._inbox:
                del buf[:at]
            elif at < end:  # the inbox was empty: the rest of this read starts it
                self._inbox = bytearray(buf[at:])

    def _whole(self, data: str | bytes, size: int) -> None:
        """A whole data message that came as one frame (the fast path of _frames)."""
        if size > self.settings.max_message:
            self._fail(TOO_BIG, f"message larger than {self.settings.max_message} bytes")
            return
        self.last_message = self.last_input  # the read it came in
        self.handler.message(self, data)

    def _event(self, event: Event) -> None:
        if isinstance(event, TextMessage | BytesMessage):
            self._data(event)
        elif isinstance(event, Ping):
            self._write(self.conn.send(event.response()))
        elif isinstance(event, Pong):
            self.ping_sent = None
        elif isinstance(event, CloseConnection):
            if self.conn.state is ConnectionState.REMOTE_CLOSING:
                # The peer closes: answer with its code, then the server closes the TCP
                # connection first (RFC 6455 7.1.1).
                if self.code is None:
                    self.code = event.code
                self._write(self.conn.send(event.response()))
                self._finish()
            elif self.conn.state is ConnectionState.CLOSED:
                self._finish()  # the answer to our close
            else:
                # wsproto could not parse the input (a bad frame, bad UTF-8): it says with
                # which code to close; nothing more is read.
                self._fail(event.code, event.reason or "")

    def _data(self, event: TextMessage | BytesMessage) -> None:
        if self.close_sent is not None:
            return  # closing: data still in flight from the peer is dropped
        size = len(event.data)
        self._frame_size += size
        self._message_size += size
        if self._frame_size > self.settings.max_frame:
            self._fail(TOO_BIG, f"frame larger than {self.settings.max_frame} bytes")
            return
        if self._message_size > self.settings.max_message:
            self._fail(TOO_BIG, f"message larger than {self.settings.max_message} bytes")
            return
        if event.frame_finished:
            self._frame_size = 0
        piece: str | bytes = event.data if isinstance(event.data, str) else bytes(event.data)
        if not event.message_finished:
            self._parts.append(piece)
            return
        parts = self._parts
        data: str | bytes = piece
        if parts:
            parts.append(piece)
            data = "".join(parts) if isinstance(piece, str) else b"".join(parts)  # type: ignore[arg-type]
            self._parts = []
        self._message_size = 0
        self.last_message = self._clock()
        self.handler.message(self, data)

    def _fail(self, code: int, reason: str) -> None:
        """Close now with ``code``: send our close frame and drop the connection (its input
        can no longer be trusted, or is not wanted)."""
        if self.code is None:
            self.code = code
        if self.transport is not None and self.conn.state is ConnectionState.OPEN:
            self._write(self.conn.send(CloseConnection(code, reason[:100])))
        self._finish()

    def _finish(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._gone(self.code if self.code is not None else CloseReason.NORMAL_CLOSURE)

    def _gone(self, code: int) -> None:
        """Once: the handler and the hub are told, the gate released."""
        if self.hub.forget(self):
            if self.code is None:
                self.code = code
            release, self._release = self._release, _nothing
            try:
                self.handler.closed(self, int(code))
            finally:
                release()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None:
            return
        read = not (self.write_paused or self.held) or self.close_sent is not None
        if read == self._reading:
            return
        self._reading = read
        if read:
            transport.resume_reading()
            if self._pump_soon is None:
                # Messages parsed before the pause come first (not here: this may run inside
                # the handler, called from _pump).
                self._pump_soon = asyncio.get_running_loop().call_soon(self._pump)
        else:
            transport.pause_reading()

    def on_tick(self, now: float) -> None:
        """The hub's sweep: keep-alive, idle timeout, close timeout."""
        settings = self.settings
        if self.close_sent is not None:
            if now - self.close_sent >= settings.close_timeout:
                self.abort()
        elif now - self.last_message >= settings.idle_timeout:
            self.close(GOING_AWAY, "idle timeout")
        elif self.ping_sent is not None:
            if now - self.ping_sent >= settings.ping_timeout:
                self._fail(INTERNAL, "keep-alive ping timeout")
        elif now - self.last_input >= settings.ping_interval and self.transport is not None:
            self.ping_sent = now
            self._write(self.conn.send(Ping(b"webtorch")))


def _nothing() -> None:
    pass


def _unmask(key: bytes | bytearray, payload: bytes | bytearray) -> bytes:
    """RFC 6455 5.3: the payload XOR the 4-byte key repeated, as two big integers (one C loop
    each way: a per-byte Python loop costs ~50 ns a byte)."""
    n = len(payload)
    if not n:
        return b""
    return (
        int.from_bytes(payload, "big") ^ int.from_bytes((key * (n // 4 + 1))[:n], "big")
    ).to_bytes(n, "big")


def _server_frame(first: int, payload: bytes) -> bytes:
    """A whole, final, unmasked frame (RFC 6455 5.2): ``first`` is FIN | opcode."""
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload
