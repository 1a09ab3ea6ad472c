"""WebSocket through the proxy: an ``Upgrade: websocket`` request on a route with ``websocket =
true`` goes to an upstream the route's group picks (its policy: sticky cookies and hashing
included), with the proxy's forwarding headers; the upstream's answer goes back as it came, and
after a 101 the bytes are piped both ways, each side's reading paused while the other's write
buffer is above its high-water mark (nothing buffers without bound). The frames are not parsed:
the two WebSocket endpoints speak to each other, as through nginx.

The tunnel's own connection to the upstream (not a pooled one: it is the WebSocket's now). One
access log line when it ends: the status, bytes to the client, its duration; /metrics counts
tunnels and bytes each way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Final, cast

import httptools

from webtorch.http.messages import Request, Response, error_response
from webtorch.http.state import AccessLogger
from webtorch.proxy.headers import request_head
from webtorch.proxy.upstream import ProxyRoute, UpstreamGroup
from webtorch.streams.hub import Hub
from webtorch.vocab import Outcome, Upstream

log: Final = logging.getLogger("webtorch.streams")
_clock: Final = time.perf_counter
_MAX_HEAD: Final = 64 * 1024  # the upstream's answer head, at most
_UPGRADE: Final = b"upgrade: websocket\r\nconnection: upgrade\r\n"
# Answers that count against the upstream in passive health, as a proxied request's do.
_UNWELL: Final = frozenset((500, 502, 503, 504))


class TunnelStats:
    def __init__(self) -> None:
        self.opened = 0  # tunnels piped (upstream answered 101)
        self.failed = 0  # no upstream, connect failed, or a bad answer
        self.bytes_up = 0  # client -> upstream
        self.bytes_down = 0  # upstream -> client


class Tunnels:
    """The finder of proxied WebSocket routes and what takes their upgrades."""

    def __init__(
        self,
        hub: Hub,
        proxied: Callable[[Request], ProxyRoute | None],
        access_log: AccessLogger | None,
    ) -> None:
        self.hub = hub
        self.proxied = proxied
        self.access_log = access_log
        self.stats = TunnelStats()

    def find(self, request: Request) -> _Route | None:
        route = self.proxied(request)
        return None if route is None else _Route(self, route)


class _Route:
    __slots__ = ("owner", "route")

    def __init__(self, owner: Tunnels, route: ProxyRoute) -> None:
        self.owner = owner
        self.route = route

    def take(
        self,
        request: Request,
        transport: asyncio.Transport,
        rest: bytes,
        release: Callable[[], None],
    ) -> Response | bool:
        group = self.route.group
        loop = asyncio.get_running_loop()
        now = loop.time()
        candidates = group.health.eligible(now)
        if not candidates:
            self.owner.stats.failed += 1
            return error_response(503, f"no upstream of {group.name!r} is available")
        upstream = group.choose(request, candidates, now)
        request.upstream = upstream.address
        head = request_head(request, self.route.trusted, _UPGRADE, upstream.address.encode())
        tunnel = Tunnel(self.owner, request, transport, release)
        # Open while it lasts, for the policies that count (least_conn, bounded-load hashing),
        # as nginx counts an upgraded connection.
        upstream.inflight += 1
        tunnel.upstream_counted = upstream
        tunnel.judged = (group, upstream, now)
        # A sticky group pins the client to this upstream: the cookie goes into the 101.
        tunnel.cookie = group.cookie_for(request, upstream)
        tunnel.start(loop, upstream.host, upstream.port, head + rest, group.config.connect_timeout)
        return True


class _Upstream(asyncio.Protocol):
    """The upstream side of a tunnel."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tunnel.upstream_made(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.tunnel.from_upstream(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.end()

    def pause_writing(self) -> None:
        if self.tunnel.client is not None:
            self.tunnel.client.pause_reading()

    def resume_writing(self) -> None:
        if self.tunnel.client is not None and self.tunnel.piping:
            self.tunnel.client.resume_reading()


class Tunnel(asyncio.Protocol):
    """One proxied WebSocket: the client's side (this protocol) and the upstream's."""

    def __init__(
        self,
        owner: Tunnels,
        request: Request,
        client: asyncio.Transport,
        release: Callable[[], None],
    ) -> None:
        self.owner = owner
        self.request = request
        self.client: asyncio.Transport | None = client
        self.upstream: asyncio.Transport | None = None
        self._release = release
        self.started = _clock()
        self.last = owner.hub.clock()
        self.piping = False
        self.status = 0
        self.down = 0  # bytes to the client
        self.up = 0
        self._head = b""  # the upstream's answer head, until it is complete
        self._parser = httptools.HttpResponseParser(self)
        self._task: asyncio.Task[None] | None = None
        self._ended = False
        self._answered = False  # a whole answer that is not a 101 came
        self.cookie: tuple[bytes, bytes] | None = None  # a Set-Cookie to add to the 101
        self.upstream_counted: Upstream | None = None  # its in-flight count, until the end
        # (group, upstream, loop time of the pick) until the opening's outcome is reported to
        # the group (passive health, the policy's statistics), as a proxied request's is.
        self.judged: tuple[UpstreamGroup, Upstream, float] | None = None
        settings = owner.hub.settings
        client.set_protocol(self)
        client.set_write_buffer_limits(high=settings.write_buffer)
        client.pause_reading()  # until the upstream has answered 101
        owner.hub.opened(self)

    # -- opening ------------------------------------------------------------------------------

    def start(
        self, loop: asyncio.AbstractEventLoop, host: str, port: int, head: bytes, limit: float
    ) -> None:
        async def connect() -> None:
            try:
                await asyncio.wait_for(
                    loop.create_connection(lambda: _Upstream(self), host, port), limit
                )
            except (OSError, TimeoutError) as exc:
                self._judge(Outcome.CONNECT_FAILED)
                self._refuse(502, f"upstream {host}:{port} unreachable: {exc}")
                return
            if self.upstream is not None:
                self.upstream.write(head)
                self.up += len(head)

        self._task = loop.create_task(connect())

    def upstream_made(self, transport: asyncio.Transport) -> None:
        if self.client is None:  # the client left while we connected
            transport.abort()
            return
        self.upstream = transport
        transport.set_write_buffer_limits(high=self.owner.hub.settings.write_buffer)

    def on_status(self, status: bytes) -> None:
        pass

    def on_headers_complete(self) -> None:
        self.status = status = self._parser.get_status_code()
        self._judge(Outcome.SERVER_ERROR if status in _UNWELL else Outcome.OK)

    def _judge(self, outcome: Outcome) -> None:
        """Report how the opening went to the upstream's group, once."""
        judged, self.judged = self.judged, None
        if judged is not None:
            group, upstream, picked = judged
            now = asyncio.get_running_loop().time()
            group.observe(upstream, outcome, now - picked, now, self.request)

    def on_message_complete(self) -> None:
        if self.status != 101:
            self._answered = True

    def _refuse(self, status: int, message: str) -> None:
        self.owner.stats.failed += 1
        self.status = status
        client = self.client
        if client is not None:
            body = error_response(status, message).body
            data = b"HTTP/1.1 %d %s\r\n%scontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
                status,
                HTTPStatus(status).phrase.encode(),
                b"content-type: application/json\r\n",
                len(body),
                body,
            )
            client.write(data)
            self.down += len(data)
            client.close()
        self.end()

    # -- piping -------------------------------------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        self.last = self.owner.hub.clock()
        client = self.client
        if client is None:
            return
        if not self.piping:
            # The answer, parsed to see its status (and, when it is not a 101, where it ends):
            # it goes to the client as it came.
            if self.status == 0:
                self._head += data
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                pass
            except httptools.HttpParserError:
                self._judge(Outcome.INVALID_RESPONSE)
                self._refuse(502, "the upstream's answer is not HTTP")
                return
            if self.status == 0:
                if len(self._head) > _MAX_HEAD:
                    self._judge(Outcome.INVALID_RESPONSE)
                    self._refuse(502, "the upstream's answer head is too large")
                return
            if self._head:
                data, self._head = self._head, b""
                if self.status == 101:
                    if self.cookie is not None:
                        end = data.find(b"\r\n\r\n")
                        if end >= 0:  # the head is whole once its status is known
                            name, value = self.cookie
                            data = b"%s\r\n%s: %s%s" % (data[:end], name, value, data[end:])
                    self.piping = True
                    self.owner.stats.opened += 1
                    client.resume_reading()
                else:
                    self.owner.stats.failed += 1
        self.down += len(data)
        self.owner.stats.bytes_down += len(data)
        client.write(data)
        if self._answered:
            self.end()  # a refusal (not a 101), whole: nothing more comes on either side

    def data_received(self, data: bytes) -> None:
        self.last = self.owner.hub.clock()
        if self.upstream is not None:
            self.up += len(data)
            self.owner.stats.bytes_up += len(data)
            self.upstream.write(data)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def eof_received(self) -> bool | None:
        if self.upstream is not None and self.upstream.can_write_eof():
            self.upstream.write_eof()
            return True  # half-closed: the upstream may still answer
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.client = None
        self.end()

    # -- ending -------------------------------------------------------------------------------

    def end(self) -> None:
        """Either side closed: close the other (its buffered bytes go first), log once."""
        if self.client is not None:
            self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        if self._ended:
            return
        self._ended = True
        # Ended before the upstream's answer head: it broke the connection, unless the client
        # left first (which says nothing about the upstream).
        self._judge(Outcome.RESET if self.client is not None else Outcome.CANCELLED)
        if self.upstream_counted is not None:
            self.upstream_counted.inflight -= 1
            self.upstream_counted = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.owner.hub.forget(self)
        release, self._release = self._release, _nothing
        release()
        access_log = self.owner.access_log
        if access_log is not None:
            try:
                access_log(self.request, self.status or 499, self.down, _clock() - self.started)
            except Exception:
                log.exception("access log failed")

    def on_tick(self, now: float) -> None:
        if now - self.last >= self.owner.hub.settings.idle_timeout:
            self.abort()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """The drain: a tunnel's frames are the endpoints' own, so no close frame can be put
        between them; it runs on until the drain's grace ends (nginx's
        worker_shutdown_timeout)."""

    def abort(self) -> None:
        if self.client is not None:
            self.client.abort()
        if self.upstream is not None:
            self.upstream.abort()
        self.end()


def _nothing() -> None:
    pass
