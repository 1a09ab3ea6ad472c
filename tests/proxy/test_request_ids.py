"""Request ids through the proxy (to the upstream and back), and the access log's lines for
proxied requests: the upstream that answered, why the policy chose it, retries, streamed bytes,
and clients that leave before their answer."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import Running, serve_in_thread
from tests.proxy.test_forward import header_values, request
from tests.proxy.upstreams import upstreams
from webtorch import config as wt_config
from webtorch.http.messages import Request
from webtorch.proxy.headers import TrustedProxies, request_head, response_headers

GENERATED_ID = re.compile(r"[0-9a-f]{32}")


@contextmanager
def proxy(
    servers: list[str], server: dict[str, Any] | None = None, **upstream: Any
) -> Iterator[Running]:
    cfg = wt_config.from_dict(
        {
            "server": {"limits": {"drain_timeout": 5}, **(server or {})},
            "upstreams": {"backend": {"servers": servers, **upstream}},
            "routes": [{"prefix": "/", "upstream": "backend"}],
        }
    )
    with serve_in_thread(cfg) as running:
        yield running


def sent_upstream(body: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(body)
    return result


# -- ids --------------------------------------------------------------------------------------


def test_an_id_is_generated_sent_upstream_and_returned() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        status, headers, body = request(running, "GET", "/echo")
        assert status == 200
        rid = headers["x-request-id"]
        assert GENERATED_ID.fullmatch(rid)
        assert header_values(sent_upstream(body), "x-request-id") == [rid]
        _, again, _ = request(running, "GET", "/echo")
        assert again["x-request-id"] != rid


def test_a_client_id_is_kept_and_a_bad_one_replaced() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        status, headers, body = request(running, "GET", "/echo", headers={"X-Request-Id": "k-42"})
        assert status == 200 and headers["x-request-id"] == "k-42"
        assert header_values(sent_upstream(body), "x-request-id") == ["k-42"]
        for bad in ("two words", "x" * 300, "<script>"):
            _, headers, body = request(running, "GET", "/echo", headers={"X-Request-Id": bad})
            rid = headers["x-request-id"]
            assert GENERATED_ID.fullmatch(rid)
            assert header_values(sent_upstream(body), "x-request-id") == [rid]


def test_errors_of_the_proxy_carry_the_id() -> None:
    with upstreams("a") as (a,):
        address = a.address
    with proxy([address], max_fails=0) as running:  # nothing listens there now
        status, headers, _ = request(running, "GET", "/", headers={"X-Request-Id": "e-1"})
        assert status == 502
        assert headers["x-request-id"] == "e-1"


def test_with_ids_off_the_header_passes_untouched() -> None:
    with upstreams("a") as (a,), proxy([a.address], {"request_id": False}) as running:
        _, headers, body = request(running, "GET", "/echo", headers={"X-Request-Id": "a b"})
        assert "x-request-id" not in headers
        assert header_values(sent_upstream(body), "x-request-id") == ["a b"]
        _, headers, body = request(running, "GET", "/echo")
        assert "x-request-id" not in headers
        assert header_values(sent_upstream(body), "x-request-id") == []


def test_request_head_sends_the_id_and_response_headers_drop_the_upstreams() -> None:
    trusted = TrustedProxies([])
    incoming = [(b"host", b"h"), (b"x-request-id", b"bad id"), (b"connection", b"x-private")]
    request = Request("GET", "/", "", incoming, b"", client="10.0.0.1", request_id=b"good")
    head = request_head(request, trusted, b"", b"up:1")
    assert head.count(b"x-request-id") == 1 and b"x-request-id: good\r\n" in head
    request.request_id = b""  # ids off: the client's header goes on as it came
    head = request_head(request, trusted, b"", b"up:1")
    assert b"x-request-id: bad id\r\n" in head
    upstream = [(b"x-request-id", b"theirs"), (b"x-other", b"1")]
    assert response_headers(upstream, own_id=True)[1] == [(b"x-other", b"1")]
    assert response_headers(upstream)[1] == upstream


# -- access log lines for proxied requests ------------------------------------------------------


def logged(tmp_path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (tmp_path / "access.log").read_bytes().splitlines()]


def test_the_log_names_the_upstream_the_reason_and_the_retries(tmp_path: Path) -> None:
    server = {"access_log": {"path": str(tmp_path / "access.log")}}
    with upstreams("a", "b") as (a, b), proxy([a.address, b.address], server) as running:
        status, first, _ = request(running, "GET", "/hello?x=1")
        assert status == 200 and first["x-upstream"] == "a"  # round robin: a, b, a...
        assert request(running, "GET", "/hello")[1]["x-upstream"] == "b"
        a.fail_with = 503  # a answers 503, so the next request is retried on b
        status, retried_headers, _ = request(running, "GET", "/retried")
        assert status == 200 and retried_headers["x-upstream"] == "b"
        assert a.hits["/retried"] == 1
    plain, _, retried = logged(tmp_path)
    assert plain["request_id"] == first["x-request-id"]
    assert plain["upstream"] == a.address
    assert (plain["path"], plain["query"], plain["route"]) == ("/hello", "x=1", "/")
    assert (plain["reason"], plain["retries"], plain["model"]) == ("round_robin", 0, None)
    assert (plain["status"], plain["bytes"]) == (200, 1)  # the upstream's name
    assert retried["request_id"] == retried_headers["x-request-id"]
    assert (retried["status"], retried["upstream"], retried["retries"]) == (200, b.address, 1)
    # With a tried, b was the only candidate left for the retry.
    assert retried["reason"] == "only_candidate"


def test_the_log_counts_streamed_bytes_and_clients_that_left(tmp_path: Path) -> None:
    server = {"access_log": {"path": str(tmp_path / "access.log")}}
    with upstreams("a") as (a,), proxy([a.address], server) as running:
        status, _, body = request(running, "GET", "/bytes?n=300000&chunked=1")
        assert status == 200 and len(body) == 300000  # above the buffer limit: streamed
        with socket.create_connection((running.host, running.port), timeout=10) as sock:
            sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\nX-Request-Id: gone-1\r\n\r\n")
            assert a.hanging.wait(10)
        assert a.wait_disconnects(1)  # the proxy let the upstream go: the client was gone
    streamed, left = logged(tmp_path)
    assert (streamed["status"], streamed["bytes"]) == (200, 300000)
    assert (left["status"], left["bytes"], left["request_id"]) == (499, 0, "gone-1")
    assert left["upstream"] == a.address
