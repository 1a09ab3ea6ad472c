"""Sticky sessions by cookie, like nginx Plus ``sticky cookie``.

The first response of a session names its upstream in a cookie; later requests that carry it go
back to that upstream as long as it is a candidate (healthy, not yet tried by this request). The
proxy asks :meth:`StickyCookie.route_of` before the policy, and adds :meth:`set_cookie` to the
response whenever :meth:`needs_cookie` says the client does not already hold the right value,
so a session whose upstream was ejected moves once and then sticks to its new upstream.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

from webtorch.balance.base import Upstream
from webtorch.balance.hashing import cookie_values
from webtorch.balance.settings import StickySettings
from webtorch.http.messages import Request

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Attribute values end at ";" and may not hold controls or spaces (RFC 6265 section 4.1.1).
_ATTRIBUTE = re.compile(r"[\x21-\x3a\x3c-\x7e]+")
_SAMESITE = {"strict": "Strict", "lax": "Lax", "none": "None"}


def route_id(address: str) -> str:
    """The cookie value naming the upstream at ``address``: 16 hex digits of its blake2b digest.

    Stable across processes and restarts (so every worker and node agrees), and it does not
    show the internal address to the client, as nginx's md5 of the server address does not.
    """
    return hashlib.blake2b(address.encode(), digest_size=8).hexdigest()


class StickyCookie:
    """The ``sticky cookie NAME expires= domain= path= httponly secure samesite=`` directive,
    from its settings (their defaults: ``StickySettings()``).

    ``expires`` is the lifetime in seconds, sent as ``Max-Age`` (no ``Expires`` date: that needs
    the wall clock, and every current browser honours Max-Age); None makes a session cookie.
    ValueError for a value a browser would reject, including ``samesite="none"`` without
    ``secure``: the one check of these values (the config's builds one).
    """

    def __init__(self, settings: StickySettings | None = None) -> None:
        s = StickySettings() if settings is None else settings
        name, expires, domain, path = s.cookie, s.expires, s.domain, s.path
        httponly, secure, samesite = s.httponly, s.secure, s.samesite
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"sticky cookie name {name!r} is not a valid cookie name")
        attributes = []
        if expires is not None:
            if not math.isfinite(expires) or expires <= 0:
                raise ValueError(f"sticky cookie expires must be > 0 seconds, got {expires!r}")
            attributes.append(f"Max-Age={math.ceil(expires)}")
        if domain is not None:
            if not _ATTRIBUTE.fullmatch(domain):
                raise ValueError(f"sticky cookie domain {domain!r} is not a valid domain")
            attributes.append(f"Domain={domain}")
        if not path.startswith("/") or not _ATTRIBUTE.fullmatch(path):
            raise ValueError(
                f"sticky cookie path {path!r} must start with / and hold no ; or space"
            )
        attributes.append(f"Path={path}")
        if secure:
            attributes.append("Secure")
        if httponly:
            attributes.append("HttpOnly")
        if samesite is not None:
            canonical = _SAMESITE.get(samesite.lower())
            if canonical is None:
                raise ValueError(
                    f"sticky cookie samesite must be strict, lax or none: {samesite!r}"
                )
            if canonical == "None" and not secure:
                # Browsers drop SameSite=None cookies that are not Secure: the session would
                # silently never stick.
                raise ValueError("sticky cookie samesite=none requires secure")
            attributes.append(f"SameSite={canonical}")
        self.name = name
        self.expires = expires
        self.domain = domain
        self.path = path
        self.httponly = httponly
        self.secure = secure
        self.samesite = samesite
        self._name = name.encode()
        self._attributes = "".join("; " + attribute for attribute in attributes)
        # Per-upstream caches: ids and headers are hashed and formatted once, not per request.
        self._ids: dict[Upstream, bytes] = {}
        self._headers: dict[Upstream, tuple[bytes, bytes]] = {}

    def _id(self, upstream: Upstream) -> bytes:
        value = self._ids.get(upstream)
        if value is None:
            value = self._ids[upstream] = route_id(upstream.address).encode()
        return value

    def route_of(self, request: Request, candidates: Sequence[Upstream]) -> Upstream | None:
        """The candidate the request's cookie names, or None (no cookie, an unknown value, or
        an upstream that is not a candidate now).

        Every cookie of the name is tried in order: a stale one from another path or domain
        can sit beside ours, and the browser decides the order, not us.
        """
        for value in cookie_values(request.headers, self._name):
            for upstream in candidates:
                if self._id(upstream) == value:
                    return upstream
        return None

    def needs_cookie(self, request: Request, upstream: Upstream) -> bool:
        """Whether the response from ``upstream`` must set the cookie: the request did not
        carry one naming ``upstream``."""
        wanted = self._id(upstream)
        return all(value != wanted for value in cookie_values(request.headers, self._name))

    def set_cookie(self, upstream: Upstream) -> tuple[bytes, bytes]:
        """The ``Set-Cookie`` response header that pins the session to ``upstream``."""
        header = self._headers.get(upstream)
        if header is None:
            value = f"{self.name}={self._id(upstream).decode()}{self._attributes}"
            header = self._headers[upstream] = (b"set-cookie", value.encode())
        return header
