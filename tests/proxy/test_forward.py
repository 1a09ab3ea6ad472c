"""The proxy against real upstream servers on loopback: forwarding, headers, streaming, failures,
retries, balancing and reloads. The proxy runs in-process on port 0 (``serve_in_thread``); the
upstreams are h11 servers (``upstreams.py``)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.conftest import Running, serve_in_thread
from tests.proxy.upstreams import pattern_bytes, upstreams
from webtorch import config as wt_config


def proxy_config(
    servers: list[str], route: dict[str, Any] | None = None, **upstream: Any
) -> wt_config.Config:
    return wt_config.from_dict(
        {
            "server": {"limits": {"drain_timeout": 5}},
            "upstreams": {"backend": {"servers": servers, **upstream}},
            "routes": [{"prefix": "/", "upstream": "backend", **(route or {})}],
        }
    )


@contextmanager
def proxy(
    servers: list[str], route: dict[str, Any] | None = None, **upstream: Any
) -> Iterator[Running]:
    with serve_in_thread(proxy_config(servers, route, **upstream)) as running:
        yield running


def request(
    running: Running,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(running.host, running.port, timeout=30)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def echo(running: Running, **kwargs: Any) -> dict[str, Any]:
    status, _, body = request(running, kwargs.pop("method", "GET"), "/echo", **kwargs)
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def header_values(sent: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in sent["headers"] if k == name]


# -- forwarding and headers ------------------------------------------------------------------


def test_get_is_forwarded_with_its_target_and_host() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        status, headers, body = request(
            running, "GET", "/echo?x=1&y=%20z", headers={"Host": "example.com"}
        )
        assert status == 200
        sent = json.loads(body)
        assert sent["target"] == "/echo?x=1&y=%20z"  # undecoded, as received
        assert header_values(sent, "host") == ["example.com"]
        assert headers["x-upstream"] == "a"
        assert headers["server"] == "webtorch"  # the upstream's own Server is not relayed


def test_hop_by_hop_headers_are_removed_both_ways() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        status, headers, body = request(
            running,
            "GET",
            "/echo",
            headers={
                "Connection": "keep-alive, x-private",
                "X-Private": "secret",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Proxy-Authorization": "Basic Zm9vOmJhcg==",
                "X-Kept": "yes",
            },
        )
        assert status == 200
        sent = {k for k, _ in json.loads(body)["headers"]}
        assert {"x-private", "keep-alive", "te", "proxy-authorization"}.isdisjoint(sent)
        assert "x-kept" in sent
        # The upstream answered with Connection: x-hop, X-Hop and Keep-Alive: none reach us.
        assert "x-hop" not in headers and "keep-alive" not in headers
        assert headers.get("connection") != "x-hop"


def test_forwarded_headers_are_set_and_client_values_replaced_when_untrusted() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        sent = echo(
            running,
            headers={
                "Host": "site.test",
                "X-Forwarded-For": "6.6.6.6",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "evil.test",
            },
        )
        assert header_values(sent, "x-forwarded-for") == ["127.0.0.1"]
        assert header_values(sent, "x-forwarded-proto") == ["http"]
        assert header_values(sent, "x-forwarded-host") == ["site.test"]


def test_forwarded_headers_from_a_trusted_proxy_are_extended() -> None:
    with upstreams("a") as (a,):
        cfg = wt_config.from_dict(
            {
                "server": {"trusted_proxies": ["127.0.0.0/8"]},
                "upstreams": {"backend": {"servers": [a.address]}},
                "routes": [{"prefix": "/", "upstream": "backend"}],
            }
        )
        with serve_in_thread(cfg) as running:
            sent = echo(
                running,
                headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"},
            )
            assert header_values(sent, "x-forwarded-for") == ["6.6.6.6, 127.0.0.1"]
            assert header_values(sent, "x-forwarded-proto") == ["https"]


def test_head_passes_the_length_without_a_body() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        status, headers, body = request(running, "HEAD", "/bytes?n=123456")
        assert status == 200 and body == b""
        assert headers["content-length"] == "123456"
        # The connection is still in sync for the next request.
        assert request(running, "GET", "/")[2] == b"a"


def test_many_requests_reuse_pooled_connections() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        conn = http.client.HTTPConnection(running.host, running.port, timeout=10)
        for _ in range(50):
            conn.request("GET", "/")
            assert conn.getresponse().read() == b"a"
        conn.close()
        assert a.connections == 1


def test_pipelined_requests_are_answered_in_order() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        with socket.create_connection((running.host, running.port), timeout=10) as sock:
            sock.sendall(
                b"GET /bytes?n=100000 HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /status?code=404 HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
        first = data.index(b"HTTP/1.1 200")
        second = data.index(b"HTTP/1.1 404")
        third = data.index(b"HTTP/1.1 200", second)
        assert first < second < third
        assert pattern_bytes(100000) in data[first:second]
        assert data.endswith(b"a")


# -- bodies, streamed both ways ----------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_upload_arrives_whole(chunked: bool) -> None:
    body = pattern_bytes(8 * 1024 * 1024 + 17)
    with upstreams("a") as (a,), proxy([a.address], {"max_body": 1 << 30}) as running:
        conn = http.client.HTTPConnection(running.host, running.port, timeout=30)
        if chunked:
            pieces = (body[i : i + 100_000] for i in range(0, len(body), 100_000))
            conn.request("POST", "/echo", body=pieces, encode_chunked=True)
        else:
            conn.request("POST", "/echo", body=body)
        sent = json.loads(conn.getresponse().read())
        conn.close()
        assert sent["body_bytes"] == len(body)
        import hashlib

        assert sent["sha256"] == hashlib.sha256(body).hexdigest()
        framing = header_values(sent, "transfer-encoding" if chunked else "content-length")
        assert framing == (["chunked"] if chunked else [str(len(body))])


@pytest.mark.parametrize("chunked", [False, True])
def test_download_arrives_whole(chunked: bool) -> None:
    n = 8 * 1024 * 1024 + 5
    with upstreams("a") as (a,), proxy([a.address]) as running:
        status, headers, body = request(running, "GET", f"/bytes?n={n}&chunked={int(chunked)}")
        assert status == 200
        assert body == pattern_bytes(n)
        if chunked:
            assert headers["transfer-encoding"] == "chunked"
        else:
            assert headers["content-length"] == str(n)


def test_upload_over_the_route_limit_is_413() -> None:
    with upstreams("a") as (a,), proxy([a.address], {"max_body": 1000}) as running:
        status, _, body = request(running, "POST", "/echo", body=b"x" * 1001)
        assert status == 413 and b"1000" in body
        assert a.hits["/echo"] == 0


def test_expect_continue_upload_is_streamed() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        with socket.create_connection((running.host, running.port), timeout=10) as sock:
            sock.sendall(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
            sock.sendall(b"hello")
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
        sent = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert sent["body_bytes"] == 5
        assert not header_values(sent, "expect")


def test_streamed_uploads_are_counted_under_their_route() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        assert request(running, "POST", "/echo", body=b"x" * 10)[0] == 200
        text = request(running, "GET", "/metrics")[2].decode()
        assert 'webtorch_http_requests_total{method="POST",route="/",status="200"} 1.0' in text
