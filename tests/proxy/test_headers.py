"""Request headers the proxy must not let a client forge, strip or smuggle (issue 19, item 6):
Connection naming end-to-end fields, repeated or invalid Host, and the forwarding headers
(Forwarded, X-Real-IP and kin) from clients that are not trusted proxies."""

from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import Running, serve_in_thread
from tests.proxy.test_forward import echo, header_values, proxy, request
from tests.proxy.upstreams import raw_upstream, upstreams
from webtorch import config as wt_config


def raw(running: Running, head: bytes) -> tuple[int, bytes]:
    """Send ``head`` as it is (http.client would not send a repeated or broken Host)."""
    with socket.create_connection((running.host, running.port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def test_connection_cannot_strip_end_to_end_headers() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        sent = echo(
            running,
            headers={
                "Host": "site.test",
                "Connection": "close, host, authorization, cookie, x-forwarded-for, "
                "forwarded, x-real-ip, content-length, sec-fetch-site, x-private",
                "Authorization": "Bearer t",
                "Cookie": "s=1",
                "Sec-Fetch-Site": "same-origin",
                "X-Private": "hop",
            },
        )
        assert header_values(sent, "host") == ["site.test"]
        assert header_values(sent, "authorization") == ["Bearer t"]
        assert header_values(sent, "cookie") == ["s=1"]
        assert header_values(sent, "sec-fetch-site") == ["same-origin"]
        assert header_values(sent, "x-forwarded-for") == ["127.0.0.1"]
        assert header_values(sent, "x-real-ip") == ["127.0.0.1"]
        assert header_values(sent, "x-private") == []  # a header that is the client's to name


def test_upstream_connection_cannot_strip_end_to_end_response_headers() -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nConnection: set-cookie, content-type, x-hop\r\n"
        b"Set-Cookie: a=1\r\nContent-Type: text/plain\r\nX-Hop: 1\r\nContent-Length: 2\r\n\r\nok"
    )
    with raw_upstream(lambda head: [response]) as up, proxy([up.address]) as running:
        status, headers, body = request(running, "GET", "/")
        assert (status, body) == (200, b"ok")
        assert headers["set-cookie"] == "a=1" and headers["content-type"] == "text/plain"
        assert "x-hop" not in headers


@pytest.mark.parametrize(
    ("hosts", "problem"),
    [
        ([b"a", b"b"], "more than one Host header"),
        ([b"a", b"a"], "more than one Host header"),
        ([b"a b"], "a character not allowed in a host name"),
        ([b"evil.com:80@good"], "bad port"),
        ([b"evil.com@good"], "a character not allowed in a host name"),
        ([b"good/evil"], "a character not allowed in a host name"),
        ([b""], "empty Host header"),
        ([b"x:99999"], "bad port"),
        ([b":80"], "no host name"),
        ([b"[::1"], "'[' without ']'"),
        ([b"[nope]:80"], "not an IPv6 address"),
        ([b"a%zz"], "bad percent-encoding"),
    ],
)
def test_repeated_or_invalid_host_is_400(hosts: list[bytes], problem: str) -> None:
    lines = b"".join(b"Host: %s\r\n" % h for h in hosts)
    with upstreams("a") as (a,), proxy([a.address]) as running:
        status, body = raw(running, b"GET /echo HTTP/1.1\r\n%sConnection: close\r\n\r\n" % lines)
        assert status == 400
        assert problem in json.loads(body)["error"]
        assert a.hits["/echo"] == 0
        # The server goes on serving everyone else.
        assert request(running, "GET", "/")[0] == 200


def test_a_control_character_in_host_is_400() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        for value in (b"a\x01b", b"a\x00b", b"a\x7fb"):
            head = b"GET /echo HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % value
            assert raw(running, head)[0] == 400
        assert a.hits["/echo"] == 0


@pytest.mark.parametrize("host", ["example.com:8080", "[::1]:80", "127.0.0.1", "xn--d-a.test"])
def test_valid_hosts_are_forwarded(host: str) -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        assert header_values(echo(running, headers={"Host": host}), "host") == [host]


def test_host_is_checked_on_every_route() -> None:
    """In the HTTP layer: a model route refuses two Hosts as a proxied one does."""
    with serve_in_thread(wt_config.from_dict({})) as running:
        status, body = raw(running, b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        assert status == 400 and "more than one Host" in json.loads(body)["error"]


SPOOFED = {
    "Host": "site.test",
    "Forwarded": "for=6.6.6.6;host=evil.test;proto=https",
    "X-Real-IP": "6.6.6.6",
    "True-Client-IP": "6.6.6.6",
    "X-Client-IP": "6.6.6.6",
    "X-Forwarded-Port": "443",
    "X-Forwarded-Prefix": "/admin",
}


def test_forwarding_headers_from_an_untrusted_client_are_replaced() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        sent = echo(running, headers=SPOOFED)
        assert header_values(sent, "forwarded") == ['for=127.0.0.1;host="site.test";proto=http']
        assert header_values(sent, "x-real-ip") == ["127.0.0.1"]
        for name in ("true-client-ip", "x-client-ip", "x-forwarded-port", "x-forwarded-prefix"):
            assert header_values(sent, name) == [], name


def test_forwarding_headers_from_a_trusted_proxy_are_kept_and_extended() -> None:
    with upstreams("a") as (a,):
        cfg = wt_config.from_dict(
            {
                "server": {"trusted_proxies": ["127.0.0.0/8"]},
                "upstreams": {"backend": {"servers": [a.address]}},
                "routes": [{"prefix": "/", "upstream": "backend"}],
            }
        )
        with serve_in_thread(cfg) as running:
            sent = echo(running, headers=SPOOFED)
            assert header_values(sent, "forwarded") == [
                'for=6.6.6.6;host=evil.test;proto=https, for=127.0.0.1;host="site.test";proto=http'
            ]
            assert header_values(sent, "x-real-ip") == ["6.6.6.6"]
            assert header_values(sent, "true-client-ip") == ["6.6.6.6"]
            assert header_values(sent, "x-forwarded-prefix") == ["/admin"]
            # Without X-Real-IP: the rightmost address of the chain that is not a trusted
            # proxy's (nginx's real_ip_recursive).
            sent = echo(running, headers={"X-Forwarded-For": "1.1.1.1, 2.2.2.2, 127.0.0.5"})
            assert header_values(sent, "x-real-ip") == ["2.2.2.2"]
            assert header_values(sent, "x-forwarded-for") == [
                "1.1.1.1, 2.2.2.2, 127.0.0.5, 127.0.0.1"
            ]


def test_an_upgrade_request_reaches_the_upstream_as_plain_http() -> None:
    """Until WebSocket proxying lands: a request that asks to switch protocols is answered as
    plain HTTP/1.1 (RFC 9110 7.8 lets a server ignore Upgrade), so the upstream never sees the
    intent (and cannot answer 101), and the connection closes after the answer."""
    with upstreams("a") as (a,), proxy([a.address]) as running:
        head = (
            b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        status, body = raw(running, head)
        assert status == 200
        names = {k for k, _ in json.loads(body)["headers"]}
        assert "upgrade" not in names and "connection" not in names


def test_proxy_connection_and_te_are_not_forwarded() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        sent = echo(running, headers={"Proxy-Connection": "keep-alive", "TE": "trailers"})
        names = {k for k, _ in sent["headers"]}
        assert "proxy-connection" not in names and "te" not in names


@pytest.mark.parametrize(
    ("peer", "node"), [("::1", b'for="[::1]"'), ("10.0.0.1", b"for=10.0.0.1"), ("", b"for=unknown")]
)
def test_forwarded_node_forms(peer: str, node: bytes) -> None:
    from webtorch.http.messages import Request
    from webtorch.proxy.headers import TrustedProxies, request_head

    request = Request("GET", "/", "", [(b"host", b"h:1")], b"", "1.1", True, peer, target=b"/")
    head = request_head(request, TrustedProxies([]), b"", b"up:1")
    assert b'\r\nforwarded: %s;host="h:1";proto=http\r\n' % node in head


@pytest.mark.parametrize("host", [b"h:1", b" h:1", b"h:1\t", b"\th:1 "])
def test_the_forwarded_host_is_the_host_without_edge_whitespace(host: bytes) -> None:
    from webtorch.http.messages import Request
    from webtorch.proxy.headers import TrustedProxies, request_head

    request = Request("GET", "/", "", [(b"host", host)], b"", "1.1", True, "10.0.0.1", target=b"/")
    head = request_head(request, TrustedProxies([]), b"", b"up:1")
    assert b'\r\nforwarded: for=10.0.0.1;host="h:1";proto=http\r\n' in head
    assert b"\r\nhost: %s\r\n" % host in head  # the header itself goes on as it came
