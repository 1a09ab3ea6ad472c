"""Whether a Host header's value is a URI authority (RFC 9110 7.2: ``uri-host [":" port]``, with
uri-host from RFC 3986 3.2.2: a reg-name, an IPv4 address or a bracketed IPv6 literal).

Upstreams build links, virtual hosts, cache keys and redirects from Host, and the proxy
forwards it (and X-Forwarded-Host, Forwarded's ``host=``): a value that is no authority at all
(``a b``, ``evil.com:80@good``, an empty one) is refused with a 400 naming the problem instead,
as RFC 9112 3.2 asks of a server. Stricter than nginx (which refuses only separators, ``..`` and
control characters), as the RFC grammar.
"""

from __future__ import annotations

import ipaddress
from typing import Final

# RFC 3986 reg-name: unreserved / pct-encoded / sub-delims. An IPv4 address is made of these too.
_REG_NAME: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%"
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_COLON: Final = ord(":")
_PERCENT: Final = ord("%")
_OPEN: Final = ord("[")
# Values found valid lately: a client sends the same Host on every request of a connection,
# and most clients the same few. Bounded; an attacker cycling values only clears it.
_KNOWN: Final[dict[bytes, bool]] = {}
_KNOWN_MAX: Final = 1024


def host_problem(value: bytes) -> str | None:
    """None when ``value`` is a valid Host, else what is wrong with it (for a 400)."""
    if value in _KNOWN:
        return None
    problem = _check(value.strip(b" \t"))
    if problem is None:
        if len(_KNOWN) >= _KNOWN_MAX:
            _KNOWN.clear()
        _KNOWN[value] = True
    return problem


def _check(value: bytes) -> str | None:
    if not value:
        return "empty Host header"
    if value[0] == _OPEN:
        end = value.find(b"]")
        if end < 0:
            return "invalid Host header: '[' without ']'"
        if not _ipv6(value[1:end]):
            return "invalid Host header: not an IPv6 address in brackets"
        rest = value[end + 1 :]
        if rest and (rest[0] != _COLON or not _port(rest[1:])):
            return "invalid Host header: bad port"
        return None
    colon = value.find(b":")
    host = value
    if colon >= 0:
        host = value[:colon]
        if not _port(value[colon + 1 :]):
            return "invalid Host header: bad port"
    if not host:
        return "invalid Host header: no host name"
    if host.translate(None, _REG_NAME):
        return "invalid Host header: a character not allowed in a host name"
    if _PERCENT in host and not _pct_encoded(host):
        return "invalid Host header: bad percent-encoding"
    return None


def _port(port: bytes) -> bool:
    """RFC 3986 allows an empty port (``host:``); a number must fit TCP's 16 bits."""
    return not port or (len(port) <= 5 and port.isdigit() and int(port) <= 65535)


def _ipv6(literal: bytes) -> bool:
    try:
        ipaddress.IPv6Address(literal.decode("ascii"))
    except ValueError:  # UnicodeDecodeError included
        return False
    return b"%" not in literal  # a zone id (RFC 6874) has no business in a Host header


def _pct_encoded(host: bytes) -> bool:
    i = host.find(b"%")
    while i >= 0:
        if i + 2 >= len(host) or host[i + 1] not in _HEX or host[i + 2] not in _HEX:
            return False
        i = host.find(b"%", i + 3)
    return True
