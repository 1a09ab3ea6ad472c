"""The server's upgrade hook (``ServerState.upgrade``): where an ``Upgrade: websocket`` request
goes. The HTTP connection (http/protocol.py) hands it over with its transport once the parser
has stopped; this finds the WebSocket route for its path (a model's stream, a proxied route
with ``websocket = true``), and that route refuses it with an HTTP answer or takes the
transport. A path with no WebSocket route is left to the handler as plain HTTP, as before.

The handshake itself is wsproto's (its H11Handshake checks the request and writes the 101), fed
the request as it was parsed: no hand-written handshake or framing here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import h11
from wsproto.connection import Connection, ConnectionType
from wsproto.events import AcceptConnection, RejectConnection
from wsproto.extensions import Extension
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from webtorch.errors import HTTPError
from webtorch.http.messages import Request, Response, error_response, response_for_error
from webtorch.streams.deflate import BoundedDeflate
from webtorch.streams.hub import Hub
from webtorch.streams.websocket import Handler, WebSocket


class WebSocketRoute(Protocol):
    """What serves WebSocket upgrades on some paths."""

    def take(
        self,
        request: Request,
        transport: asyncio.Transport,
        rest: bytes,
        release: Callable[[], None],
    ) -> Response | bool: ...


# The route for a request's path, or None (not a WebSocket path: plain HTTP).
Finder = Callable[[Request], WebSocketRoute | None]


class Upgrades:
    """``ServerState.upgrade``: the WebSocket routes, found by ``finders`` in order."""

    def __init__(self, hub: Hub, finders: list[Finder]) -> None:
        self.hub = hub
        self.finders = finders

    def __call__(
        self,
        request: Request,
        transport: asyncio.Transport,
        rest: bytes,
        release: Callable[[], None],
    ) -> Response | bool:
        for find in self.finders:
            route = find(request)
            if route is not None:
                if self.hub.draining:
                    return error_response(503, "the server is shutting down")
                if self.hub.full():
                    self.hub.refused += 1
                    return error_response(
                        503,
                        f"too many WebSocket connections open "
                        f"(streams.max_connections = {self.hub.settings.max_connections})",
                    )
                try:
                    return route.take(request, transport, rest, release)
                except HTTPError as exc:
                    return response_for_error(exc)
        return False


def handshake(request: Request) -> H11Handshake:
    """wsproto's server handshake, fed ``request``; raises HTTPError (400, or 426 for another
    WebSocket version) when it is not a valid WebSocket opening handshake."""
    shake = H11Handshake(ConnectionType.SERVER)
    head = [b"GET %s HTTP/1.1\r\n" % (request.target or request.path.encode())]
    for name, value in request.headers:
        head.append(b"%s: %s\r\n" % (name, value))
    head.append(b"\r\n")
    try:
        shake.receive_data(b"".join(head))
        for _event in shake.events():
            break
    except (RemoteProtocolError, h11.RemoteProtocolError) as exc:
        hint = getattr(exc, "event_hint", None)
        status = hint.status_code if isinstance(hint, RejectConnection) else 400
        raise _Refused(status, f"bad WebSocket handshake: {exc}") from None
    return shake


class _Refused(HTTPError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def accept(
    hub: Hub,
    shake: H11Handshake,
    handler: Handler,
    transport: asyncio.Transport,
    rest: bytes,
    release: Callable[[], None],
) -> WebSocket:
    """Answer 101 and put a WebSocket protocol on ``transport``; ``rest`` (frames the client
    sent right after its request) is read first."""
    settings = hub.settings
    extensions: list[Extension] = [BoundedDeflate(settings.max_message)] if settings.deflate else []
    head = shake.send(AcceptConnection(extensions=extensions))
    conn = shake.connection
    assert isinstance(conn, Connection)
    ws = WebSocket(hub, conn, handler, release)
    # With permessage-deflate in use every frame goes through wsproto (the extension is its).
    ws.split = not any(extension.enabled() for extension in extensions)
    transport.write(head)
    ws.sent += len(head)
    transport.set_protocol(ws)
    ws.connection_made(transport)
    if rest:
        ws.data_received(rest)
    return ws
