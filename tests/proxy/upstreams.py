"""Real upstream servers for proxy tests: h11 (an HTTP implementation independent of the proxy's
httptools) over asyncio streams, in a thread with its own loop, on a free port.

Behaviour is chosen by path, so one server covers every case:
  /echo            consume the body (counted and hashed, never stored); answer what arrived
  /bytes?n=N[&chunked=1]   stream N bytes of a fixed pattern (Content-Length or chunked)
  /status?code=N   answer status N
  /reset?after=K   announce a long body, send K bytes of it, then reset the connection
  /close           close the connection without answering
  /hang            never answer (a black hole) until the client goes away
  /health          200 while ``healthy``, else 503
  /v2/health/load  ``{"inflight": load_inflight, "latency": load_latency}`` (a load report)
  anything else    200 with the server's name
Every response carries ``x-upstream: NAME``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import parse_qs, urlsplit

import h11

PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(n: int) -> bytes:
    whole, rest = divmod(n, len(PATTERN))
    return PATTERN * whole + PATTERN[:rest]


class TestUpstream:
    __test__ = False  # not a pytest class

    def __init__(self, name: str = "up", port: int = 0, nodelay: bool = False) -> None:
        self.name = name
        self.port = port
        self.nodelay = nodelay  # TCP_NODELAY on its connections
        self.healthy = True
        self.fail_with: int | None = None  # answer every request with this status (not /health)
        self.load_inflight = 0  # what /v2/health/load reports
        self.load_latency = 0.0
        self.hits: Counter[str] = Counter()  # by path
        self.disconnects = 0  # connections closed by the client while a request was on
        self.hanging = threading.Event()  # set when a /hang request arrived
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread: threading.Thread | None = None
        self._disconnected = threading.Condition()
        self._hit = threading.Condition()

    # -- control, from the test's thread ---------------------------------------------------

    def start(self) -> TestUpstream:
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def main() -> None:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            self.port = sock.getsockname()[1]
            self._server = await asyncio.start_server(self._handle, sock=sock, limit=1 << 20)
            ready.set()

        def run() -> None:
            loop.run_until_complete(main())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Close the listener and every connection at once (as a killed process would)."""
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = None

    def wait_for_hits(self, path: str, count: int, timeout: float = 10) -> bool:
        with self._hit:
            return self._hit.wait_for(lambda: self.hits[path] >= count, timeout)

    def wait_disconnects(self, count: int, timeout: float = 10) -> bool:
        with self._disconnected:
            return self._disconnected.wait_for(lambda: self.disconnects >= count, timeout)

    # -- serving ---------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.connections += 1
        if self.nodelay:
            # As real servers do: without it a response's head and body, written apart, meet
            # the client's delayed ACK and a kept-alive exchange takes ~40 ms (Nagle).
            sock = writer.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await self._next(conn, reader)
                if isinstance(event, h11.ConnectionClosed) or event is None:
                    return
                assert isinstance(event, h11.Request)
                keep = await self._respond(conn, event, reader, writer)
                if not keep or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.RemoteProtocolError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event | None:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(1 << 16)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return None
                continue
            if event is h11.PAUSED:
                return None
            return event  # type: ignore[return-value]

    async def _respond(
        self,
        conn: h11.Connection,
        request: h11.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        target = request.target.decode()
        url = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        with self._hit:
            self.hits[path] += 1
            self._hit.notify_all()
        # Read the whole body first (counted and hashed as it arrives: bounded memory).
        digest = hashlib.sha256()
        size = 0
        hash_body = path == "/echo" and query.get("hash", "1") == "1"
        while True:
            event = await self._next(conn, reader)
            if event is None:
                self._note_disconnect()
                return False
            if isinstance(event, h11.Data):
                size += len(event.data)
                if hash_body:
                    digest.update(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break

        async def send(*events: h11.Event) -> None:
            for ev in events:
                data = conn.send(ev)
                if data:
                    writer.write(data)
            await writer.drain()

        base = [(b"x-upstream", self.name.encode())]
        if self.fail_with is not None and path not in ("/health", "/v2/health/load"):
            body = f"failing with {self.fail_with}".encode()
            headers = [*base, (b"content-length", str(len(body)).encode())]
            await send(
                h11.Response(status_code=self.fail_with, headers=headers), h11.Data(data=body)
            )
        elif path == "/echo":
            body = json.dumps(
                {
                    "name": self.name,
                    "method": request.method.decode(),
                    "target": target,
                    "headers": [[k.decode(), v.decode()] for k, v in request.headers],
                    "body_bytes": size,
                    "sha256": digest.hexdigest() if hash_body else None,
                }
            ).encode()
            headers = [*base, (b"content-type", b"application/json")]
            headers += [(b"content-length", str(len(body)).encode())]
            headers += [(b"connection", b"x-hop"), (b"x-hop", b"1"), (b"keep-alive", b"timeout=5")]
            await send(h11.Response(status_code=200, headers=headers), h11.Data(data=body))
        elif path == "/bytes":
            n = int(query.get("n", "0"))
            chunked = query.get("chunked") == "1"
            headers = list(base)
            if chunked:
                headers.append((b"transfer-encoding", b"chunked"))
            else:
                headers.append((b"content-length", str(n).encode()))
            await send(h11.Response(status_code=200, headers=headers))
            sent = 0
            while sent < n:
                piece = PATTERN[: min(len(PATTERN), n - sent)]
                if request.method != b"HEAD":
                    await send(h11.Data(data=piece))
                sent += len(piece)
        elif path == "/status":
            code = int(query.get("code", "200"))
            body = f"status {code}".encode()
            headers = [*base, (b"content-length", str(len(body)).encode())]
            await send(h11.Response(status_code=code, headers=headers), h11.Data(data=body))
        elif path == "/reset":
            after = int(query.get("after", "0"))
            headers = [*base, (b"content-length", b"10000000")]
            await send(h11.Response(status_code=200, headers=headers))
            if after:
                await send(h11.Data(data=pattern_bytes(after)))
            writer.transport.abort()
            return False
        elif path == "/close":
            writer.transport.abort()
            return False
        elif path == "/hang":
            self.hanging.set()
            await reader.read()  # returns b"" when the client goes away
            self._note_disconnect()
            return False
        elif path == "/v2/health/load":
            body = json.dumps(
                {"inflight": self.load_inflight, "latency": self.load_latency}
            ).encode()
            headers = [*base, (b"content-type", b"application/json")]
            headers += [(b"content-length", str(len(body)).encode())]
            await send(h11.Response(status_code=200, headers=headers), h11.Data(data=body))
        elif path == "/health":
            code = 200 if self.healthy else 503
            headers = [*base, (b"content-length", b"2")]
            await send(h11.Response(status_code=code, headers=headers), h11.Data(data=b"ok"))
        else:
            body = self.name.encode()
            headers = [*base, (b"content-length", str(len(body)).encode())]
            if request.method == b"HEAD":
                await send(h11.Response(status_code=200, headers=headers))
            else:
                await send(h11.Response(status_code=200, headers=headers), h11.Data(data=body))
        await send(h11.EndOfMessage())
        return True

    def _note_disconnect(self) -> None:
        with self._disconnected:
            self.disconnects += 1
            self._disconnected.notify_all()


@contextlib.contextmanager
def upstreams(*names: str, nodelay: bool = False) -> Iterator[list[TestUpstream]]:
    started = [TestUpstream(name, nodelay=nodelay).start() for name in names]
    try:
        yield started
    finally:
        for up in started:
            up.stop()


class RawUpstream:
    """A misbehaving upstream: a blocking socket server in a thread that reads each request's
    head and answers with ``respond(head)``'s bytes, written piece by piece as the iterable
    yields them, exactly as given (no HTTP library to refuse a broken response). After the
    answer it keeps the connection and reads until the proxy closes it, recording that in
    ``closed`` (a threading.Event per connection, in order) and how much it had written in
    ``sent``. A write the proxy refuses by closing ends the answer early."""

    __test__ = False

    def __init__(self, respond: Callable[[bytes], Iterable[bytes]]) -> None:
        self.respond = respond
        self.requests: list[bytes] = []  # the heads received, in order
        self.closed: list[threading.Event] = []
        self.sent: list[int] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            index = len(self.closed)
            self.closed.append(threading.Event())
            self.sent.append(0)
            thread = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket, index: int) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                self.requests.append(head)
                for piece in self.respond(head):
                    conn.sendall(piece)
                    self.sent[index] += len(piece)
        except OSError:
            return
        finally:
            self.closed[index].set()
            conn.close()

    def close(self) -> None:
        self._sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def raw_upstream(respond: Callable[[bytes], Iterable[bytes]]) -> Iterator[RawUpstream]:
    server = RawUpstream(respond)
    try:
        yield server
    finally:
        server.close()
