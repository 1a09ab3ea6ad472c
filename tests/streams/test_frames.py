"""The WebSocket's own frame cutting (streams/websocket.py: whole data frames straight to the
handler while OPEN, every other frame through wsproto): byte-exact against wsproto alone, over
a real socket pair, whatever the read boundaries; and the refusals it makes itself."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct

import pytest
from wsproto.connection import Connection, ConnectionType

from tests.streams.conftest import stream_server
from tests.streams.test_websocket import _close_code, _handshake
from webtorch.config import StreamsConfig
from webtorch.streams.hub import Hub
from webtorch.streams.websocket import WebSocket, _unmask


def _mask(key: bytes, payload: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack("!Q", n)
    return head + key + _mask(key, payload)


@pytest.mark.parametrize("n", [*range(10), 125, 126, 4097, 70000])
def test_unmask_is_the_rfc_xor(n: int) -> None:
    key, payload = os.urandom(4), os.urandom(n)
    assert _unmask(key, payload) == _mask(key, payload)
    assert _unmask(bytearray(key), bytearray(payload)) == _mask(key, payload)


class _Recorder:
    def __init__(self, want: int) -> None:
        self.messages: list[str | bytes] = []
        self.want = want
        self.done = asyncio.Event()
        self.code: int | None = None

    def message(self, ws: WebSocket, data: str | bytes) -> None:
        self.messages.append(data)
        if len(self.messages) == self.want:
            self.done.set()

    def closed(self, ws: WebSocket, code: int) -> None:
        self.code = code
        self.done.set()


# Multi-byte UTF-8 (2, 3 and 4 bytes), cut inside a character by the fragmentation below.
TEXT = "zé€😀" * 40
BLOB = bytes(range(256)) * 300  # 76,800 bytes: a 64-bit length when whole


def _traffic() -> tuple[bytes, list[str | bytes], list[bytes]]:
    """Frames of every kind a client sends (whole messages of each length form, fragmented
    ones with pings between their fragments), the messages they make, the pings' payloads."""
    raw = TEXT.encode()
    frames = [
        _frame(0x1, b'{"x": [1, 2, 3]}'),
        _frame(0x2, b"\x00\x01\x02"),
        _frame(0x1, b""),
        _frame(0x1, raw[:1] + raw[1:201]),  # 16-bit length
        _frame(0x2, BLOB),  # 64-bit length
        _frame(0x1, raw[:7], fin=False),  # cut inside the 4-byte character
        _frame(0x9, b"ping-1"),
        _frame(0x0, raw[7:100], fin=False),
        _frame(0x0, b"", fin=False),
        _frame(0x9, b"ping-2"),
        _frame(0x0, raw[100:]),
        _frame(0x1, "après".encode()),
        _frame(0x2, BLOB[:1000], fin=False),
        _frame(0x0, BLOB[1000:]),
        _frame(0xA, b"unsolicited pong"),
        _frame(0x1, b"last"),
    ]
    messages: list[str | bytes] = [
        '{"x": [1, 2, 3]}',
        b"\x00\x01\x02",
        "",
        raw[:201].decode(),
        BLOB,
        TEXT,
        "après",
        BLOB,
        "last",
    ]
    return b"".join(frames), messages, [b"ping-1", b"ping-2"]


async def _serve_pair(data: bytes, split: bool, seed: int) -> tuple[list[str | bytes], bytes]:
    """A WebSocket on one end of a socket pair, ``data`` written to the other in random
    pieces; the messages its handler saw and the bytes it answered with."""
    loop = asyncio.get_running_loop()
    server_sock, client = socket.socketpair()
    client.setblocking(False)
    settings = StreamsConfig(max_frame=1 << 20, max_message=1 << 20)
    hub = Hub(settings, loop.time)
    recorder = _Recorder(9)

    def make() -> WebSocket:
        ws = WebSocket(hub, Connection(ConnectionType.SERVER), recorder, lambda: None)
        ws.split = split
        return ws

    transport, _ws = await loop.connect_accepted_socket(make, server_sock)
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        step = rng.choice([1, 2, 3, 7, 64, 1500, 40000])
        await loop.sock_sendall(client, data[at : at + step])
        at += step
    await asyncio.wait_for(recorder.done.wait(), 10)
    transport.close()
    answered = b""
    while chunk := await loop.sock_recv(client, 65536):
        answered += chunk
    client.close()
    return recorder.messages, answered


@pytest.mark.parametrize("seed", range(4))
def test_mixed_frames_decode_byte_exact_whatever_the_reads(seed: int) -> None:
    data, messages, pings = _traffic()
    pongs = b"".join(b"\x8a" + bytes([len(p)]) + p for p in pings)
    for split in (True, False):  # the shortcut, and wsproto alone: the same
        got, answered = asyncio.run(_serve_pair(data, split, seed))
        assert got == messages
        assert [type(m) for m in got] == [type(m) for m in messages]
        assert answered == pongs


def test_a_frame_over_the_limit_is_refused_at_its_header() -> None:
    """A frame whose header announces more than max_frame closes with 1009 before any of its
    payload is sent (it is not buffered to find out)."""
    with stream_server({"max_frame": 1000}) as running:
        sock = _handshake(running)
        sock.sendall(b"\x81\xff" + struct.pack("!Q", 1 << 40) + os.urandom(4))
        assert _close_code(sock) == 1009
        sock.close()


def test_text_that_is_not_utf8_in_a_whole_frame_closes_with_1007() -> None:
    """Invalid UTF-8 in a whole frame, after a valid one in the same read: wsproto, given the
    frame, closes with 1007."""
    with stream_server() as running:
        sock = _handshake(running, "/v2/models/gru/stream")
        sock.sendall(_frame(0x1, b'{"id": 1, "x": [1, 2, 3]}') + _frame(0x1, b"ok \xc3\x28"))
        assert _close_code(sock) == 1007
        sock.close()


def test_a_whole_data_frame_inside_a_fragmented_message_closes_with_1002() -> None:
    """A message in progress takes continuation frames only (RFC 6455 5.4): a whole text
    frame between its fragments is not a message of its own but a protocol error."""
    with stream_server() as running:
        sock = _handshake(running, "/v2/models/gru/stream")
        sock.sendall(_frame(0x1, b'{"id": 1, ', fin=False) + _frame(0x1, b'{"x": [1, 2, 3]}'))
        assert _close_code(sock) == 1002
        sock.close()


class _HoldThenClose(_Recorder):
    """Holds the connection at the first message, then closes it: as a stream whose queue is
    full and then ends."""

    def message(self, ws: WebSocket, data: str | bytes) -> None:
        super().message(ws, data)
        if len(self.messages) == 1:
            ws.hold(True)
            ws.close(1000, "done")


async def _hold_then_close(split: bool) -> tuple[list[str | bytes], int | None, bytes]:
    loop = asyncio.get_running_loop()
    server_sock, client = socket.socketpair()
    client.setblocking(False)
    hub = Hub(StreamsConfig(), loop.time)
    recorder = _HoldThenClose(want=-1)

    def make() -> WebSocket:
        ws = WebSocket(hub, Connection(ConnectionType.SERVER), recorder, lambda: None)
        ws.split = split
        return ws

    await loop.connect_accepted_socket(make, server_sock)
    # Two items in one read: the first holds and closes, the second waits; then the client's
    # answer to the close, in a read of its own once the server's close frame is out.
    await loop.sock_sendall(client, _frame(0x1, b"one") + _frame(0x1, b"two"))
    answered = b""
    while b"\x88" not in answered:
        answered += await loop.sock_recv(client, 65536)
    await loop.sock_sendall(client, _frame(0x8, struct.pack("!H", 1000)))
    await asyncio.wait_for(recorder.done.wait(), 10)
    while chunk := await loop.sock_recv(client, 65536):
        answered += chunk
    client.close()
    return recorder.messages, recorder.code, answered


@pytest.mark.parametrize("split", [True, False])
def test_a_held_connection_that_closes_still_reads_the_peers_close(split: bool) -> None:
    """Holding stops reading messages, not the close handshake: once the server has sent its
    close, the peer's close frame behind a held message is read and the connection ends with
    the server's code (not after close_timeout)."""
    messages, code, answered = asyncio.run(_hold_then_close(split))
    assert messages == ["one"]
    assert code == 1000
    assert answered.startswith(b"\x88")  # the server's close frame, then EOF
