"""The server shell: listening sockets, the once-a-second clock, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import cast

from webtorch.http.limits import Limits
from webtorch.http.messages import Handler
from webtorch.http.protocol import AccessLogger, HttpProtocol, Observer, ServerState, StreamMatch

log = logging.getLogger("webtorch.http")


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
    ) -> None:
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
        self._server: asyncio.Server | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        state = self.state
        self._server = await loop.create_server(
            # HttpProtocol is compiled to a native class, which cannot subclass
            # asyncio.Protocol; the loop only calls its methods.
            lambda: cast(asyncio.Protocol, HttpProtocol(state, loop)),
            self.host,
            self.port,
            ssl=self.ssl_context,
            backlog=4096,
            reuse_address=True,
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
        self.state.tick(self._loop.time())
        self._schedule_tick()

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
