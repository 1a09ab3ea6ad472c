"""The server shell: listening sockets, the once-a-second clock, graceful shutdown."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import ssl
from typing import cast

from webtorch.http.limits import Limits
from webtorch.http.messages import Handler
from webtorch.http.protocol import HttpProtocol
from webtorch.http.state import AccessLogger, Observer, ServerState, StreamMatch

log = logging.getLogger("webtorch.http")

# Seconds between two log lines saying the process is out of file descriptors.
_FD_LOG_INTERVAL = 60.0


def connection_cap(configured: int, nofile: int | None = None) -> int:
    """``configured`` (server.limits.max_connections), lowered so that client connections leave
    file descriptors to everything else: upstream connections, model, WAL and log files. A
    quarter of the limit (``nofile``: RLIMIT_NOFILE's soft value), at least 64, stays free."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY or nofile <= 0:
        return configured
    return max(1, min(configured, nofile - max(64, nofile // 4)))


class HttpServer:
    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        *,
        limits: Limits | None = None,
        observer: Observer | None = None,
        ssl_context: ssl.SSLContext | None = None,
        stream_match: StreamMatch | None = None,
        access_log: AccessLogger | None = None,
        request_ids: bool = False,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
    ) -> None:
        """``sock``: a listening socket to accept from instead of binding ``host``:``port`` (a
        worker's, opened by its master); ``reuse_port``: bind with SO_REUSEPORT, beside the other
        workers' sockets on the same port (webtorch/workers/)."""
        scheme = "https" if ssl_context is not None else "http"
        self.state = ServerState(
            handler,
            limits,
            observer,
            stream_match=stream_match,
            scheme=scheme,
            access_log=access_log,
            request_ids=request_ids,
        )
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.sock = sock
        self.reuse_port = reuse_port
        self._server: asyncio.Server | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd_log_at = 0.0

    def apply_limits(self, limits: Limits) -> None:
        """``limits`` for new connections (a reload; open ones keep theirs), the connection cap
        included: lowered as at the start to what RLIMIT_NOFILE leaves room for. A cap below
        the connections open now closes none of them: new ones take idle ones' places (or
        get 503s) until the count is under it."""
        state = self.state
        state.limits = limits
        state.max_connections = connection_cap(limits.max_connections)
        if state.max_connections < limits.max_connections:
            log.info(
                "at most %d client connections at once (server.limits.max_connections = %d; "
                "ulimit -n %d leaves room for fewer: raise it to allow more)",
                state.max_connections,
                limits.max_connections,
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        state = self.state
        self.apply_limits(state.limits)

        def protocol() -> asyncio.Protocol:
            # HttpProtocol is compiled to a native class, which cannot subclass
            # asyncio.Protocol; the loop only calls its methods.
            return cast(asyncio.Protocol, HttpProtocol(state, loop))

        if self.sock is not None:
            self._server = await loop.create_server(
                protocol, sock=self.sock, ssl=self.ssl_context, backlog=4096
            )
        else:
            self._server = await loop.create_server(
                protocol,
                self.host,
                self.port,
                ssl=self.ssl_context,
                backlog=4096,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
        self._schedule_tick()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) pairs; the real port when started with port 0."""
        if self._server is None:
            return []
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    def _schedule_tick(self) -> None:
        assert self._loop is not None
        self._tick = self._loop.call_later(1.0, self._on_tick)

    def _on_tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.state.tick(now)
        self.check_descriptors(now)
        self._schedule_tick()

    def check_descriptors(self, now: float) -> bool:
        """Whether a file descriptor can still be opened; says so in the log when not (at most
        once a minute). Out of descriptors, no connection can be accepted, and nothing would
        tell: uvloop (libuv) then accepts and closes each pending connection at once, which
        spares a busy loop but logs nothing (asyncio's loop logs and retries a second later).
        The connection cap keeps client connections below the limit; this once-a-second probe
        (one open and close) catches the rest, such as descriptors held by other work."""
        try:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                return True  # not what this probe looks for (and the tick must go on)
            if now >= self._fd_log_at:
                self._fd_log_at = now + _FD_LOG_INTERVAL
                log.error(
                    "out of file descriptors (%s; %d client connections open): new "
                    "connections are being refused; raise ulimit -n or lower "
                    "server.limits.max_connections",
                    exc.strerror,
                    len(self.state.connections),
                )
            return False
        os.close(fd)
        return True

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_timeout), close the rest."""
        if self._server is not None:
            self._server.close()
        self.state.start_draining()
        try:
            await asyncio.wait_for(self.state.wait_closed(), self.state.limits.drain_timeout)
        except TimeoutError:
            log.warning("drain timeout: closing %d connection(s)", len(self.state.connections))
            for conn in list(self.state.connections):
                if conn.transport is not None:
                    conn.transport.abort()
        if self._tick is not None:
            self._tick.cancel()
        if self._server is not None:
            await self._server.wait_closed()
