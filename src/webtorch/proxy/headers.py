"""What a proxy changes in the headers it forwards, both ways (sans-IO).

Hop-by-hop headers (RFC 9110 7.6.1) describe one connection and never cross the proxy: the fixed
set below, every ``Proxy-*`` header, and whatever the ``Connection`` header names. Framing
(Content-Length, Transfer-Encoding) is the proxy's to set for each side. ``X-Forwarded-*`` from a
client are believed only from a configured trusted proxy; from anyone else they are replaced, so
a client cannot forge the address that rate limits, logs and upstreams see.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

from webtorch.http.messages import COMMON_METHODS, Headers, Request

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Request headers the proxy writes itself. Expect: 100-continue was answered to the client
# already; the upstream gets the body without waiting for its own 100. X-Request-Id is the
# request's id when ids are on (the client's when it was sane), else passed on as it came.
_REQUEST_OWN: Final = frozenset(
    {
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
    }
)
_REQUEST_DROP: Final = HOP_BY_HOP | _REQUEST_OWN
# Response headers the server writes itself (as nginx hides the upstream's Server and Date).
_RESPONSE_DROP: Final = HOP_BY_HOP | {b"content-length", b"content-type", b"server", b"date"}
# With request ids on, the server also answers the X-Request-Id itself.
_RESPONSE_DROP_ID: Final = _RESPONSE_DROP | {b"x-request-id"}


class TrustedProxies:
    """Addresses whose X-Forwarded-* headers are believed. Answers are cached per address: a
    proxy sees few distinct peers, and ``ipaddress`` parsing costs microseconds."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._cache: dict[str, bool] = {}

    def __contains__(self, client: str) -> bool:
        if not self.networks:
            return False
        known = self._cache.get(client)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            trusted = False
        else:
            trusted = any(address in network for network in self.networks)
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[client] = trusted
        return trusted


_PLAIN_CONNECTION: Final = frozenset(
    {b"keep-alive", b"close", b"Keep-Alive", b"Close", b"Keep-alive"}
)
_METHODS: Final = {m: m.encode() for m in COMMON_METHODS}


def _named(value: bytes) -> frozenset[bytes]:
    """The header names a Connection header lists (its keep-alive and close options aside).
    Callers skip the plain values (_PLAIN_CONNECTION) before calling: almost every request."""
    tokens = {t.strip().lower() for t in value.split(b",")}
    return frozenset(tokens - {b"keep-alive", b"close", b""})


def request_head(
    request: Request,
    trusted: TrustedProxies,
    framing: bytes,
    default_host: bytes,
) -> bytes:
    """The request line and headers to send upstream, ending with the blank line.

    ``framing`` is the body framing header line(s) ("content-length: N\\r\\n", chunked, or
    b""). The client's Host is kept (as Envoy does; nginx users write ``proxy_set_header Host
    $host`` for the same); a request without one gets ``default_host``.

    One pass over the headers in the common case; a Connection header that names other headers
    (rare) costs a second pass to drop those. Each line is one ``b"%s" %`` formatting, which
    mypyc compiles into a single allocation (no format string parsed, no ``+`` chain of
    intermediate objects), and the lines one join: this runs once per proxied request.
    """
    believed = request.client in trusted
    request_id = request.request_id
    forwarded_for: bytes | None = None
    forwarded_proto: bytes | None = None
    forwarded_host: bytes | None = None
    host: bytes | None = None
    named: frozenset[bytes] | None = None
    method = _METHODS.get(request.method) or request.method.encode("ascii")
    target = request.target or b"/"
    parts = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    for name, value in request.headers:
        if name in _REQUEST_DROP or name.startswith(b"proxy-"):
            if name == b"connection":
                if value not in _PLAIN_CONNECTION:
                    named = _named(value) if named is None else named | _named(value)
            elif name == b"x-request-id":
                if not request_id:  # ids off: the client's header goes on as it is
                    parts.append(b"%s: %s\r\n" % (name, value))
            elif believed:
                if name == b"x-forwarded-for":
                    forwarded_for = (
                        value if forwarded_for is None else b"%s, %s" % (forwarded_for, value)
                    )
                elif name == b"x-forwarded-proto":
                    forwarded_proto = value
                elif name == b"x-forwarded-host":
                    forwarded_host = value
            continue
        if name == b"host":
            host = value
        parts.append(b"%s: %s\r\n" % (name, value))
    if named:
        parts = parts[:1]
        for name, value in request.headers:
            if name in named:
                continue
            if not (name in _REQUEST_DROP or name.startswith(b"proxy-")) or (
                name == b"x-request-id" and not request_id
            ):
                parts.append(b"%s: %s\r\n" % (name, value))
    if host is None:
        host = default_host
        parts.append(b"host: %s\r\n" % host)
    if request_id:
        parts.append(b"x-request-id: %s\r\n" % request_id)
    client: bytes = request.client.encode()  # an IP address: ASCII
    if forwarded_for is not None:
        client = b"%s, %s" % (forwarded_for, client)
    if forwarded_proto is None:
        forwarded_proto = b"https" if request.scheme == "https" else b"http"
    if forwarded_host is None:
        forwarded_host = host
    parts.append(
        b"x-forwarded-for: %s\r\nx-forwarded-proto: %s\r\nx-forwarded-host: %s\r\n%s\r\n"
        % (client, forwarded_proto, forwarded_host, framing)
    )
    return b"".join(parts)


def response_headers(raw: Headers, own_id: bool = False) -> tuple[bytes | None, Headers]:
    """The upstream response's Content-Type and the headers to pass on to the client;
    ``own_id``: the server answers the request's X-Request-Id itself (the upstream's is
    dropped)."""
    content_type = None
    named: frozenset[bytes] | None = None
    kept: Headers = []
    drop = _RESPONSE_DROP_ID if own_id else _RESPONSE_DROP
    for header in raw:
        name = header[0]
        if name in drop or name.startswith(b"proxy-"):
            if name == b"content-type":
                content_type = header[1]
            elif name == b"connection" and header[1] not in _PLAIN_CONNECTION:
                named = _named(header[1]) if named is None else named | _named(header[1])
            continue
        kept.append(header)
    if named:
        kept = [h for h in kept if h[0] not in named]
    return content_type, kept
