"""Request targets as routing sees them (issue 19's siblings of items 6 and 11).

- Dot segments are resolved before routing (RFC 3986 5.2.4, ``%2e`` counting as a dot), and the
  normalised path is what a proxy forwards: ``/api/%2e%2e/admin`` used to match the ``/api/``
  prefix and go raw to its upstream, which may resolve it to ``/admin``. A ``..`` above the root
  is a 400, and so is an encoded slash that would make a dot segment for a server decoding it.
- An absolute-form target's authority replaces the Host header (RFC 9112 3.2.2): the proxy
  forwarded the client's Host instead.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import serve_in_thread
from tests.http import test_protocol
from tests.http.test_fuzz import _exchange
from tests.http.test_protocol import MakeConn, req
from tests.proxy.upstreams import upstreams
from webtorch import config as wt_config
from webtorch.http.limits import Limits
from webtorch.http.messages import Request, Response, json_response
from webtorch.http.router import Route
from webtorch.http.state import ServerState

# test_protocol's fixtures: a fake-transport connection on a loop of its own.
loop = test_protocol.loop
make = test_protocol.make


def seen(request: Request) -> Response:
    return json_response(
        {
            "path": request.path,
            "query": request.query,
            "target": request.target.decode("latin-1"),
            "host": (request.header(b"host") or b"").decode("latin-1"),
            "hosts": sum(1 for name, _ in request.headers if name == b"host"),
        }
    )


@pytest.mark.parametrize(
    ("target", "path", "forwarded"),
    [
        ("/api/../admin", "/admin", "/admin"),
        ("/api/%2e%2e/admin", "/admin", "/admin"),
        ("/api/%2E./admin?q=../x", "/admin", "/admin?q=../x"),
        ("/api/.%2e/admin", "/admin", "/admin"),
        ("/api/./x", "/api/x", "/api/x"),
        ("/api/%2e/x?", "/api/x", "/api/x?"),
        ("/api//..//admin", "/api//admin", "/api//admin"),  # 5.2.4 keeps empty segments
        ("/a/b/..", "/a/", "/a/"),
        ("/a/b/.", "/a/b/", "/a/b/"),
        ("/.", "/", "/"),
        ("/a/b/../../c%20d", "/c d", "/c%20d"),
        ("http://h/api/../admin?x=1", "/admin", "/admin?x=1"),
        # Not dot segments: left as they are.
        ("/static/app.js", "/static/app.js", "/static/app.js"),
        ("/a/..b/.c/...", "/a/..b/.c/...", "/a/..b/.c/..."),
        ("/a/%2e%2ex", "/a/..x", "/a/%2e%2ex"),
        ("/q?path=/../../etc", "/q", "/q?path=/../../etc"),
        ("/projects/group%2Fname", "/projects/group/name", "/projects/group%2Fname"),
    ],
)
def test_dot_segments_are_resolved_before_routing(
    make: MakeConn, target: str, path: str, forwarded: str
) -> None:
    conn = make(seen)
    conn.send(req("GET", target))
    [resp] = conn.responses()
    assert resp.status == 200, resp.body
    assert (resp.json()["path"], resp.json()["target"]) == (path, forwarded)


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("/..", "climbs above the root"),
        ("/api/../../admin", "climbs above the root"),
        ("/%2e%2e/etc/passwd", "climbs above the root"),
        ("/a/.%2E/%2e./x", "climbs above the root"),
        ("http://h/../x", "climbs above the root"),
        ("/api/x%2F..%2F..%2Fadmin", "encoded slash (%2F)"),
        ("/api/x%2f.", "encoded slash (%2F)"),
    ],
)
def test_a_path_above_the_root_or_hiding_dots_is_a_400(
    make: MakeConn, target: str, problem: str
) -> None:
    conn = make(seen)
    conn.send(req("GET", target) + req("GET", "/next"))
    [resp] = conn.responses()
    assert resp.status == 400
    assert problem in resp.json()["error"]


def test_a_streamed_route_is_matched_on_the_normalised_path(make: MakeConn) -> None:
    """Proxied routes are matched when the headers are in: by the same normalised path."""
    route = Route("/up/", seen, "up", prefix=True, stream=True)
    state = ServerState(
        seen, Limits(), stream_match=lambda p: route if p.startswith("/up/") else None
    )
    conn = make(state=state)
    conn.send(req("POST", "/up/%2e%2e/other", body=b"abc") + req("POST", "/x/../up/y", body=b"d"))
    first, second = conn.responses()
    assert (first.json()["path"], first.json()["target"]) == ("/other", "/other")
    assert (second.json()["path"], second.json()["target"]) == ("/up/y", "/up/y")


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("http://good.example:8080/a", "good.example:8080"),
        ("http://good.example/a?x=1", "good.example"),
        ("https://[::1]:8443/a#f", "[::1]:8443"),
        ("http://good.example?x=1", "good.example"),
    ],
)
def test_an_absolute_target_s_authority_replaces_host(
    make: MakeConn, target: str, host: str
) -> None:
    conn = make(seen)
    conn.send(req("GET", target))  # with "Host: test"
    [resp] = conn.responses()
    assert resp.status == 200, resp.body
    assert (resp.json()["host"], resp.json()["hosts"]) == (host, 1)


def test_an_http_1_0_absolute_target_without_host_gets_one(make: MakeConn) -> None:
    conn = make(seen)
    conn.send(b"GET http://good.example/a HTTP/1.0\r\n\r\n")
    [resp] = conn.responses()
    assert (resp.json()["host"], resp.json()["hosts"]) == ("good.example", 1)


@pytest.mark.parametrize("target", ["http://a%zz/x", "http://ex;ample\\/x", "http://:80/x"])
def test_an_invalid_authority_in_the_target_is_a_400(make: MakeConn, target: str) -> None:
    conn = make(seen)
    conn.send(req("GET", target))
    responses = conn.responses()
    assert responses, "no answer"
    assert responses[0].status == 400


def _proxy(routes: list[dict[str, Any]], names: dict[str, str]) -> wt_config.Config:
    return wt_config.from_dict(
        {
            "upstreams": {group: {"servers": [address]} for group, address in names.items()},
            "routes": routes,
        }
    )


def test_proxy_routes_and_forwards_the_normalised_path() -> None:
    """End to end: ``/api/`` goes to upstream a, the rest to b. A dot segment that leaves
    ``/api/`` is routed (and forwarded) where it leads, never to a as it was sent."""
    with upstreams("a", "b") as (a, b):
        cfg = _proxy(
            [{"prefix": "/api/", "upstream": "a"}, {"prefix": "/", "upstream": "b"}],
            {"a": a.address, "b": b.address},
        )
        with serve_in_thread(cfg) as running:
            escaped, dotted, plain, above = _exchange(
                running,
                req("GET", "/api/%2e%2e/echo")
                + req("GET", "/api/../echo?q=../x")
                + req("GET", "/api/./x/../y")
                + req("GET", "/api/../../echo"),
                4,
            )
    assert escaped.headers[b"x-upstream"] == b"b"
    assert escaped.json()["target"] == "/echo"
    assert dotted.headers[b"x-upstream"] == b"b"
    assert dotted.json()["target"] == "/echo?q=../x"  # the query is left as it came
    assert plain.headers[b"x-upstream"] == b"a"
    assert a.hits["/api/y"] == 1
    assert above.status == 400 and "climbs above the root" in above.json()["error"]
    assert sum(a.hits.values()) == 1 and sum(b.hits.values()) == 2


def test_proxy_forwards_an_absolute_target_s_authority_as_host() -> None:
    with upstreams("a") as (a,):
        cfg = _proxy([{"prefix": "/", "upstream": "a"}], {"a": a.address})
        with serve_in_thread(cfg) as running:
            [resp] = _exchange(
                running,
                req("GET", "http://good.example:81/echo"),  # with "Host: test"
                1,
            )
    headers: dict[str, list[str]] = {}
    for name, value in resp.json()["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    assert resp.json()["target"] == "/echo"
    assert headers["host"] == ["good.example:81"]
    assert headers["x-forwarded-host"] == ["good.example:81"]
    assert 'host="good.example:81"' in headers["forwarded"][0]
