"""The load of benchmarks/streams.py: N WebSocket streams, each sending items at a steady rate,
from one process and one core (uvloop).

A general WebSocket client (the ``websockets`` package) spends ~50 us of Python per message
(framing, masking, a coroutine per send), which caps one core near 20,000 messages/s, below the
issue's 1,000 streams x 50 items/s. So this client does the opening handshake with wsproto
(its H11Handshake builds the request and checks the 101, Sec-WebSocket-Accept included), and
then writes frames built and masked ONCE before the run (the items of a stream are the same
bytes each time round: what changes per item is its position, and an item without an ``id`` is
numbered by the server in arrival order, so the answer for item k says ``"id": k``). Each send
is then one ``transport.write`` of ready bytes. Answers (unmasked server frames) are read by a
minimal frame reader: FIN/opcode, 7/16/64-bit lengths, continuation, ping (answered with a
masked pong) and close.

Timing: each stream sends one message every 1/rate s; the streams are spread over the period in
slots of 1 ms (stream i in slot i mod slots), so that the server sees a steady flow rather than
bursts. A stream whose socket pushes back (the server reads slower than it writes: the
transport's buffer is over its high-water mark) skips its turn: what the server takes is what it
sustains. ``lag`` reports how late the load itself ran against its schedule: when it grows, the
load generator, not the server, is the limit.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import Sequence

import orjson
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, Request
from wsproto.handshake import H11Handshake

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def mask(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 5.3: payload XOR the 4-byte key repeated."""
    n = len(payload)
    if n == 0:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )


def client_frame(payload: bytes, opcode: int = TEXT, fin: bool = True) -> bytes:
    """One masked frame, as a client sends it (a fresh random key)."""
    key = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + key + mask(payload, key)


class FrameReader:
    """Server-to-client frames (unmasked, RFC 6455 5.2) out of a byte stream: whole messages
    (continuations joined) and control frames, in order."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._parts: list[bytes] = []
        self._opcode = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buffer
        buf += data
        out: list[tuple[int, bytes]] = []
        at = 0
        end = len(buf)
        while end - at >= 2:
            b0, b1 = buf[at], buf[at + 1]
            if b1 & 0x80:
                raise ValueError("a server frame is never masked (RFC 6455 5.1)")
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if end - at < 4:
                    break
                n = (buf[at + 2] << 8) | buf[at + 3]
                head = 4
            elif n == 127:
                if end - at < 10:
                    break
                (n,) = struct.unpack_from("!Q", buf, at + 2)
                head = 10
            if end - at < head + n:
                break
            payload = bytes(buf[at + head : at + head + n])
            at += head + n
            opcode, fin = b0 & 0x0F, b0 & 0x80
            if opcode >= 0x8:  # control frames come whole, between fragments too
                out.append((opcode, payload))
                continue
            if opcode:
                self._opcode = opcode
            if not fin:
                self._parts.append(payload)
                continue
            if self._parts:
                self._parts.append(payload)
                payload = b"".join(self._parts)
                self._parts = []
            out.append((self._opcode, payload))
        del buf[:at]
        return out


class Stream(asyncio.Protocol):
    """One WebSocket stream: its handshake, its answers, its latencies."""

    def __init__(self, host: str, target: str, load: Load) -> None:
        self.load = load
        self.shake = H11Handshake(ConnectionType.CLIENT)
        self.request = self.shake.send(Request(host=host, target=target))
        self.head = bytearray()
        self.reader: FrameReader | None = None
        self.transport: asyncio.Transport | None = None
        self.hello: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.paused = False
        self.sent_at: dict[int, float] = {}  # item number -> when it went (window-completing)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.shake.receive_data(bytes(self.head[: end + 4]))
            events = list(self.shake.events())
            if not any(isinstance(e, AcceptConnection) for e in events):
                self.hello.set_exception(ConnectionError(f"no 101: {bytes(self.head[:200])!r}"))
                return
            self.reader = FrameReader()
            data = bytes(self.head[end + 4 :])
        for opcode, payload in self.reader.feed(data):
            if opcode in (TEXT, BINARY):
                if not self.hello.done():
                    self.hello.set_result(payload)
                else:
                    self.load.answer(self, payload)
            elif opcode == PING:
                assert self.transport is not None
                self.transport.write(client_frame(payload, PONG))
            elif opcode == CLOSE:
                self.closed = True
                if self.transport is not None:
                    self.transport.write(client_frame(payload[:2], CLOSE))
                    self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if not self.hello.done():
            self.hello.set_exception(exc or ConnectionError("closed before the hello"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


class Load:
    """N streams; ``frames[j]`` the j-th message of a stream (cycled), ``items[j]`` how many
    items it carries; a window-completing item is timed to its answer."""

    def __init__(
        self,
        host: str,
        port: int,
        target: str,
        n: int,
        frames: Sequence[Sequence[bytes]],
        per_message: int,
        rate: float,
        timed: int = 50,
        every: int = 10,
    ) -> None:
        self.host, self.port, self.target = host, port, target
        self.n = n
        self.frames = frames  # one cycle of messages per data set; stream i uses i % len
        self.per_message = per_message
        self.rate = rate  # items/s per stream
        self.timed, self.every = timed, every
        self.streams: list[Stream] = []
        self.sent = 0  # items written
        self.skipped = 0  # turns skipped because the socket pushed back
        self.answers = 0
        self.errors = 0
        self.latencies: list[float] = []
        self.measuring = False
        self.lag = 0.0  # the largest delay of a slot behind its schedule, s
        self._counts: list[int] = []  # items sent per stream

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for i in range(self.n):
            _, stream = await loop.create_connection(
                lambda: Stream(f"{self.host}:{self.port}", self.target, self),
                self.host,
                self.port,
            )
            await stream.hello
            self.streams.append(stream)
            self._counts.append(0)
            del i

    def answer(self, stream: Stream, payload: bytes) -> None:
        self.answers += 1
        doc = orjson.loads(payload)
        at = stream.sent_at.pop(doc.get("id", -1), None)
        if "error" in doc:
            self.errors += 1
        elif at is not None and self.measuring:
            self.latencies.append(time.perf_counter() - at)

    async def run(self, seconds: float, slot: float = 0.001) -> None:
        """Each stream sends a message every per_message/rate s, streams spread over the period
        in slots of ``slot`` s."""
        period = self.per_message / self.rate
        slots = max(1, round(period / slot))
        slot = period / slots
        groups = [self.streams[s::slots] for s in range(slots)]
        firsts = [range(s, self.n, slots) for s in range(slots)]
        frames, counts, per = self.frames, self._counts, self.per_message
        first, every = self.timed - 1, self.every  # item numbers that complete a due window
        clock = time.perf_counter
        start = clock()
        turns = int(seconds / slot)
        for turn in range(turns):
            due = start + turn * slot
            now = clock()
            if due > now:
                await asyncio.sleep(due - now)
            else:  # late: still let the loop read the answers that came meanwhile
                self.lag = max(self.lag, now - due)
                await asyncio.sleep(0)
            s = turn % slots
            for i, stream in zip(firsts[s], groups[s], strict=True):
                transport = stream.transport
                if transport is None or stream.paused:
                    self.skipped += 1
                    continue
                k = counts[i]
                cycle = frames[i % len(frames)]
                last = k + per - 1  # the item number of the message's last item
                for item in range(k, last + 1):
                    if item >= first and (item - first) % every == 0:
                        stream.sent_at[item] = clock()
                transport.write(cycle[(k // per) % len(cycle)])
                counts[i] = k + per
                self.sent += per

    async def close(self) -> None:
        for stream in self.streams:
            if stream.transport is not None and not stream.closed:
                stream.transport.write(client_frame(struct.pack("!H", 1000), CLOSE))
                stream.transport.close()
        await asyncio.sleep(0)


def text_frames(messages: Sequence[bytes]) -> list[bytes]:
    return [client_frame(m, TEXT) for m in messages]


def binary_frames(messages: Sequence[bytes]) -> list[bytes]:
    return [client_frame(m, BINARY) for m in messages]
