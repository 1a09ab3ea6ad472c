"""What a proxy changes in the headers it forwards, both ways (sans-IO).

Hop-by-hop headers (RFC 9110 7.6.1) describe one connection and never cross the proxy: the fixed
set below, every ``Proxy-*`` header, and whatever the ``Connection`` header names, except fields
that are end-to-end by definition (Host, Authorization, Cookie, the forwarding headers...): a
sender must not list those (RFC 9110 7.6.1), and honouring them would let a client strip what an
upstream relies on (``Connection: close, host`` left an HTTP/1.1 request without Host). Framing
(Content-Length, Transfer-Encoding) is the proxy's to set for each side.

What a proxy asserts about the client's connection (``X-Forwarded-*``, ``Forwarded``,
``X-Real-IP`` and their unofficial kin) is believed only from a configured trusted proxy; from
anyone else it is dropped and the proxy's own X-Forwarded-For/-Proto/-Host, X-Real-IP and
Forwarded are sent, so a client cannot forge the address that rate limits, logs and upstreams
see.
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
        b"forwarded",
        b"x-real-ip",
    }
)
# Other claims about the client's connection that proxies and CDNs make and frameworks read:
# passed on from a trusted proxy as it sent them, dropped from anyone else.
_CLIENT_CLAIMS: Final = frozenset(
    {
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-forwarded-ssl",
        b"x-forwarded-scheme",
        b"x-original-forwarded-for",
        b"x-client-ip",
        b"client-ip",
        b"true-client-ip",
        b"x-cluster-client-ip",
    }
)
_REQUEST_DROP: Final = HOP_BY_HOP | _REQUEST_OWN | _CLIENT_CLAIMS
# Fields a Connection header cannot remove: end-to-end by definition (RFC 9110 7.6.1 forbids
# listing them), and what routing, credentials, framing and the forwarding headers rest on.
_END_TO_END: Final = frozenset(
    {
        b"host",
        b"authorization",
        b"cookie",
        b"set-cookie",
        b"content-length",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"content-location",
        b"content-disposition",
        b"transfer-encoding",
        b"location",
        b"www-authenticate",
        b"origin",
        b"referer",
        b"user-agent",
        b"accept",
        b"accept-encoding",
        b"accept-language",
        b"cache-control",
        b"pragma",
        b"expires",
        b"etag",
        b"last-modified",
        b"vary",
        b"range",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"if-range",
        b"strict-transport-security",
        b"content-security-policy",
    }
    | _REQUEST_OWN
    | _CLIENT_CLAIMS
)
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
_COLON: Final = ord(":")
_SPACE: Final = ord(" ")  # what strip() removes (ASCII whitespace) is this byte or below


def _named(value: bytes) -> frozenset[bytes]:
    """The header names a Connection header lists that are its to remove: its keep-alive and
    close options aside, and never an end-to-end field (_END_TO_END, ``Sec-*``). Callers skip
    the plain values (_PLAIN_CONNECTION) before calling: almost every request."""
    tokens = {t.strip().lower() for t in value.split(b",")}
    return frozenset(
        t
        for t in tokens - _END_TO_END - {b"keep-alive", b"close", b""}
        if not t.startswith(b"sec-")
    )


def _without(parts: list[bytes], named: frozenset[bytes]) -> list[bytes]:
    """The header lines of ``parts`` (after the request line) whose names are not ``named``."""
    kept = parts[:1]
    for line in parts[1:]:
        if line[: line.index(b":")] not in named:
            kept.append(line)
    return kept


def _real_client(chain: bytes, trusted: TrustedProxies) -> bytes | None:
    """The client of an X-Forwarded-For chain from a trusted proxy: its rightmost address that
    is not a trusted proxy's (nginx's realip with ``real_ip_recursive``); None if none is an
    address."""
    for entry in reversed(chain.split(b",")):
        text = entry.strip().decode("latin-1")
        if text in trusted:
            continue
        try:
            ipaddress.ip_address(text)
        except ValueError:
            return None
        return text.encode()
    return None


def _node(address: bytes) -> bytes:
    """An address as a Forwarded ``for=`` node (RFC 7239 6): IPv6 in quoted brackets, and
    ``unknown`` when there is none (a Unix socket's peer)."""
    if _COLON in address:
        return b'"[%s]"' % address
    return address or b"unknown"


def request_head(
    request: Request,
    trusted: TrustedProxies,
    framing: bytes,
    default_host: bytes,
) -> bytes:
    """The request line and headers to send upstream, ending with the blank line.

    ``framing`` is the body framing header line(s) ("content-length: N\\r\\n", chunked, or
    b""). The client's Host is kept (as Envoy does; nginx users write ``proxy_set_header Host
    $host`` for the same; the server refused an invalid or repeated one); a request without one
    gets ``default_host``.

    The forwarding headers: X-Forwarded-For gets the peer appended, X-Real-IP is the client
    (the peer, or the one a trusted proxy names), Forwarded (RFC 7239) gets this hop's element
    ``for=<peer>;host="<host>";proto=<scheme>`` appended; X-Forwarded-Proto and -Host are the
    trusted proxy's, else this connection's.

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
    forwarded: bytes | None = None
    real_ip: bytes | None = None
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
                elif name == b"forwarded":
                    forwarded = value if forwarded is None else b"%s, %s" % (forwarded, value)
                elif name == b"x-real-ip":
                    real_ip = value
                elif name in _CLIENT_CLAIMS:
                    parts.append(b"%s: %s\r\n" % (name, value))
            continue
        if name == b"host":
            host = value
        parts.append(b"%s: %s\r\n" % (name, value))
    if named:
        parts = _without(parts, named)
    if host is None:
        host = default_host
        parts.append(b"host: %s\r\n" % host)
    if request_id:
        parts.append(b"x-request-id: %s\r\n" % request_id)
    peer: bytes = request.client.encode()  # an IP address: ASCII
    client = peer
    if forwarded_for is not None:
        client = b"%s, %s" % (forwarded_for, peer)
        if real_ip is None:
            real_ip = _real_client(forwarded_for, trusted)
    if real_ip is None:
        real_ip = peer
    proto = b"https" if request.scheme == "https" else b"http"
    if forwarded_proto is None:
        forwarded_proto = proto
    if forwarded_host is None:
        forwarded_host = host
    # This hop's Forwarded element: for=<peer>;host="<host>";proto=<scheme>, after the trusted
    # proxy's elements if any. Host is quoted (a port's colon is not a token character); the
    # server let through only a valid Host (no quote or backslash in one), and strip() (a
    # method looked up by name) runs only when an edge byte may be whitespace.
    bare = host
    if bare and (bare[0] <= _SPACE or bare[-1] <= _SPACE):
        bare = bare.strip()
    if forwarded is not None:
        forwarded += b", "
    else:
        forwarded = b""
    # One formatting for all of it (one allocation; the element is not built apart).
    parts.append(
        b"x-forwarded-for: %s\r\nx-forwarded-proto: %s\r\nx-forwarded-host: %s\r\n"
        b'x-real-ip: %s\r\nforwarded: %sfor=%s;host="%s";proto=%s\r\n%s\r\n'
        % (
            client,
            forwarded_proto,
            forwarded_host,
            real_ip,
            forwarded,
            _node(peer),
            bare,
            proto,
            framing,
        )
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
