"""Sticky sessions by cookie."""

from __future__ import annotations

import re

import pytest

from webtorch.balance.base import Upstream
from webtorch.balance.settings import StickySettings
from webtorch.balance.sticky import StickyCookie, route_id
from webtorch.http.messages import Headers, Request


def group(count: int) -> list[Upstream]:
    return [Upstream(f"10.0.0.{i}:80", f"10.0.0.{i}", 80, index=i) for i in range(count)]


def with_cookie(*values: bytes) -> Request:
    headers: Headers = [(b"cookie", value) for value in values]
    return Request("GET", "/", "", headers, b"")


def cookie_pair(header: tuple[bytes, bytes]) -> bytes:
    """What a browser sends back for a Set-Cookie header: the name=value before attributes."""
    name, value = header
    assert name == b"set-cookie"
    return value.split(b";", 1)[0]


def cookie(name: str, **settings: object) -> StickyCookie:
    return StickyCookie(StickySettings(cookie=name, **settings))  # type: ignore[arg-type]


def test_defaults_are_the_configs() -> None:
    # One copy of the defaults: a group with [upstreams.X.sticky] and no keys gets this cookie.
    default = StickyCookie()
    assert default.name == "webtorch_route"
    assert default.set_cookie(group(1)[0])[1].endswith(b"; Path=/; HttpOnly")


def test_round_trip() -> None:
    ups = group(3)
    sticky = cookie("route")
    for upstream in ups:
        request = with_cookie(b"theme=dark; " + cookie_pair(sticky.set_cookie(upstream)))
        assert sticky.route_of(request, ups) is upstream
        assert not sticky.needs_cookie(request, upstream)
        assert all(sticky.needs_cookie(request, other) for other in ups if other is not upstream)


def test_no_cookie_needs_one() -> None:
    ups = group(2)
    sticky = cookie("route")
    request = Request("GET", "/", "", [], b"")
    assert sticky.route_of(request, ups) is None
    assert sticky.needs_cookie(request, ups[0])


def test_unknown_or_foreign_value_is_no_route() -> None:
    ups = group(2)
    sticky = cookie("route")
    assert sticky.route_of(with_cookie(b"route=0123456789abcdef"), ups) is None
    assert sticky.route_of(with_cookie(b"route=10.0.0.1:80"), ups) is None
    # The right value under another name is not ours.
    other = route_id(ups[1].address).encode()
    assert sticky.route_of(with_cookie(b"other=" + other), ups) is None


def test_cookie_for_a_non_candidate_is_no_route() -> None:
    ups = group(3)
    sticky = cookie("route")
    request = with_cookie(cookie_pair(sticky.set_cookie(ups[1])))
    assert sticky.route_of(request, [ups[0], ups[2]]) is None  # ejected or already tried
    assert sticky.needs_cookie(request, ups[0])  # the session moves, and says so


def test_stale_duplicate_and_quoted_values() -> None:
    ups = group(2)
    sticky = cookie("route")
    ours = route_id(ups[1].address).encode()
    # A stale cookie of the same name (another path) ahead of ours, in a second header.
    request = with_cookie(b"route=deadbeefdeadbeef", b'route="' + ours + b'"')
    assert sticky.route_of(request, ups) is ups[1]
    assert not sticky.needs_cookie(request, ups[1])


def test_route_id_is_short_stable_and_hides_the_address() -> None:
    value = route_id("10.0.0.1:80")
    assert re.fullmatch(r"[0-9a-f]{16}", value)
    assert value == route_id("10.0.0.1:80") != route_id("10.0.0.2:80")
    assert value == "10baba142dbc806b"  # pinned: changing it breaks every live session


def test_header_attributes() -> None:
    upstream = group(1)[0]
    rid = route_id(upstream.address)
    assert cookie("srv").set_cookie(upstream) == (
        b"set-cookie",
        f"srv={rid}; Path=/; HttpOnly".encode(),
    )
    full = cookie(
        "srv",
        expires=3600.5,
        domain=".example.com",
        path="/api",
        httponly=False,
        secure=True,
        samesite="none",
    )
    assert full.set_cookie(upstream)[1] == (
        f"srv={rid}; Max-Age=3601; Domain=.example.com; Path=/api; Secure; SameSite=None".encode()
    )
    lax = cookie("srv", samesite="LAX").set_cookie(upstream)[1]
    assert lax.endswith(b"; HttpOnly; SameSite=Lax")


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"cookie": "my route"}, "not a valid cookie name"),
        ({"cookie": "r", "expires": 0.0}, "expires"),
        ({"cookie": "r", "expires": float("inf")}, "expires"),
        ({"cookie": "r", "domain": "a.com; evil"}, "domain"),
        ({"cookie": "r", "path": "api"}, "path"),
        ({"cookie": "r", "samesite": "sometimes"}, "samesite"),
        ({"cookie": "r", "samesite": "none"}, "requires secure"),
    ],
)
def test_bad_settings(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        StickyCookie(StickySettings(**kwargs))  # type: ignore[arg-type]
