"""Issue 19, items 2 and 4: the guard reads bodies. Proxied requests with a body (dispatched to
their route as soon as their headers are in, the body streaming behind) pass the guard, and
their bodies are scanned value by value as they stream, up to a budget; an attack found
mid-upload never completes upstream and the client gets 403. Model routes' bodies are read past
the first KiB. Path segments and header values are read too."""

from __future__ import annotations

import functools
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import XOR, Running, serve_in_thread
from tests.proxy.test_forward import request
from tests.proxy.upstreams import TestUpstream, upstreams
from webtorch import config as wt_config
from webtorch.guard.clients import shown_client
from webtorch.guard.features import PROBE_LIMIT, BodyScanner, RequestView, body_kind

SQLI = "1' OR '1'='1"
# A browser's headers: a bare scripted client's look like abuse to the detector (429).
BROWSER = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
    "Accept": "application/json",
}
FORM = {**BROWSER, "Content-Type": "application/x-www-form-urlencoded"}
JSON_TYPE = {**BROWSER, "Content-Type": "application/json"}


@contextmanager
def guarded_proxy(**guard: Any) -> Iterator[tuple[Running, TestUpstream]]:
    with upstreams("up") as (up,):
        cfg = wt_config.from_dict(
            {
                "models": {"xor": {"path": str(XOR)}},
                "upstreams": {"backend": {"servers": [up.address]}},
                "routes": [{"prefix": "/api/", "upstream": "backend"}],
                "guard": {"mode": "enforce", **guard},
            }
        )
        with serve_in_thread(cfg) as running:
            yield running, up


def test_a_proxied_request_with_a_body_passes_the_guard() -> None:
    with guarded_proxy() as (running, up):
        # The query of a POST used to skip the guard: a body sent it past, straight upstream.
        query = "/api/search?q=" + quote(SQLI, safe="")
        assert request(running, "POST", query, b"a=1", FORM)[0] == 403
        assert up.hits["/api/search"] == 0


@pytest.mark.parametrize(
    ("body", "benign", "headers"),
    [
        (b"q=" + quote(SQLI, safe="").encode(), b"q=blue+shoes&page=2", FORM),
        (json.dumps({"q": SQLI}).encode(), b'{"q": "blue shoes", "page": 2}', JSON_TYPE),
        (  # JSON escapes
            b'{"q": "\\u0027 OR \\u00271\\u0027=\\u00271"}',
            b'{"q": "caf\\u00e9 au lait"}',
            JSON_TYPE,
        ),
        (  # past the first KiB
            b"a=" + b"x" * 1000 + b"&q=" + quote(SQLI, safe="").encode(),
            b"a=" + b"x" * 1000 + b"&q=blue+shoes",
            FORM,
        ),
        (  # a password is read where the detector reads a body's first KiB, not alone
            b"username=admin&password=" + quote("' OR '1'='1' --", safe="").encode(),
            b"username=ren%C3%A9e&password=T%5Eyv%5DiHc%24t%28%5B%28%2F%22T",
            FORM,
        ),
        (
            b"<search><q>1&#39; OR &#39;1&#39;=&#39;1</q></search>",
            b"<search><q>blue shoes</q></search>",
            {**BROWSER, "Content-Type": "text/xml"},
        ),
    ],
)
def test_an_attack_in_a_proxied_body_is_blocked(
    body: bytes, benign: bytes, headers: dict[str, str]
) -> None:
    with guarded_proxy() as (running, _):
        assert request(running, "POST", "/api/search", body, headers)[0] == 403
        assert request(running, "POST", "/api/search", benign, headers)[0] == 200


def upload(
    running: Running,
    head: bytes,
    chunks: list[bytes],
    then: list[bytes] = [],  # noqa: B006 (never changed)
    between: Callable[[], object] = lambda: None,
) -> bytes:
    """A chunked upload sent piece by piece, ``between()`` called after ``chunks`` and before
    ``then``; then whatever the server answers."""
    with socket.create_connection((running.host, running.port), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        between()
        for chunk in then:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


def test_an_attack_late_in_a_streamed_upload_never_completes_upstream() -> None:
    head = (
        b"POST /api/search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0\r\nAccept: */*\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
    )
    padding = [b"a=" + b"x" * 20_000 + b"&"] + [b"b=" + b"y" * 20_000 + b"&"] * 2
    # The value is split across two chunks: each alone is harmless.
    tail = [b"q=1%27%20OR%20", b"%271%27%3D%271"]
    with guarded_proxy() as (running, up):
        # The upstream has the request and the padding (streamed to it) when the attack comes.
        started = functools.partial(up.wait_for_hits, "/api/search", 1)
        answer = upload(running, head, padding, tail, started)
        assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
        assert up.wait_disconnects(1)  # abandoned mid-body: the upstream never got it whole
        # The same upload without the attack goes through whole.
        answer = upload(running, head, [*padding, b"q=1 or maybe 2"])
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_past_the_budget_a_body_goes_unread_or_is_refused() -> None:
    body = b"a=" + b"x" * 5000 + b"&q=" + quote(SQLI, safe="").encode()
    with guarded_proxy(body_scan_bytes=4096) as (running, _):
        assert request(running, "POST", "/api/search", body, FORM)[0] == 200  # "stop": unread
    with guarded_proxy(body_scan_bytes=4096, body_scan_over="refuse") as (running, _):
        status, _, answer = request(running, "POST", "/api/search", body, FORM)
        assert status == 403 and b"body_scan_bytes" in answer
        assert request(running, "POST", "/api/search", b"a=1", FORM)[0] == 200


def test_the_budget_warning_never_logs_a_client_key_whole(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 19, item 4's sibling: the warning named the client, a keyed one by its API key."""
    body = b"a=" + b"x" * 5000
    key = "sk-secret-0123456789abcdef"
    with (
        caplog.at_level(logging.WARNING, logger="webtorch"),
        guarded_proxy(body_scan_bytes=4096, client_key="header:x-api-key") as (running, _),
    ):
        headers = {**FORM, "X-Api-Key": key}
        assert request(running, "POST", "/api/search", body, headers)[0] == 200
    [line] = [r.getMessage() for r in caplog.records if "scanning budget" in r.getMessage()]
    assert key[3:] not in line and shown_client("key:" + key) in line


def test_a_model_routes_body_is_read_past_its_first_kib() -> None:
    padded = {"inputs": [{"name": "x", "pad": "x" * 1000, "note": SQLI}]}
    with guarded_proxy() as (running, _):
        body = json.dumps(padded).encode()
        assert request(running, "POST", "/v2/models/xor/infer", body, JSON_TYPE)[0] == 403


UNION = "' UNION SELECT username, password FROM users--"


# Each passed the detector before it read these values on their own (scores 0.0004-0.02).
@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/api/item/" + quote(UNION, safe=""), BROWSER),  # a path segment
        ("/api/search", {**BROWSER, "User-Agent": BROWSER["User-Agent"] + " " + SQLI}),
        ("/api/search", {**BROWSER, "Referer": "https://shop/?q=" + quote(UNION, safe="")}),
        ("/api/search", {**BROWSER, "X-Custom": "1' AND SLEEP(5)--"}),
    ],
)
def test_attacks_in_the_path_and_headers_are_blocked(target: str, headers: dict[str, str]) -> None:
    with guarded_proxy() as (running, _):
        assert request(running, "GET", target, None, headers)[0] == 403
        assert (
            request(running, "GET", "/api/item/blue-shoes", None, {**BROWSER, "X-Custom": "v1"})[0]
            == 200
        )


def test_the_scanner_finds_values_across_chunks_in_bounded_memory() -> None:
    kind = body_kind([(b"content-type", b"multipart/form-data; boundary=XyZ")])
    assert kind is not None
    scanner = BodyScanner(kind[0], 1 << 20, kind[1])
    body = (
        b"--XyZ\r\nContent-Disposition: form-data; name=\"q\"\r\n\r\n1' OR '1'='1\r\n"
        b'--XyZ\r\nContent-Disposition: form-data; name="f"; filename="a.bin"\r\n\r\n'
        b"'\"<>;--binary\r\n--XyZ--\r\n"
    )
    probes = [p for i in range(0, len(body), 7) for p in scanner.feed(body[i : i + 7])]
    assert any(p == b"1' OR '1'='1" for p in probes)  # the field, whole once its line is
    assert not any(b"binary" in p for p in probes)  # a file's content is not a parameter
    long = BodyScanner("form", 1 << 20)
    for _ in range(100):
        long.feed(b"x'" * 5_000)  # one endless value
        assert len(long._tail) <= PROBE_LIMIT  # what waits for the rest stays bounded
    # Each window of it is a probe: the probe budget runs out before the byte budget.
    assert long.over and long.probes == 0 and long.scanned == 10_000
    plain = BodyScanner("form", 1 << 20)
    assert all(plain.feed(b"x" * 10_000) == [] for _ in range(100))  # plain bytes: no probes
    assert not plain.over and plain.scanned == 1_000_000
    # A value arriving a byte at a time is probed as it grows, not at every byte.
    slow = BodyScanner("form", 1 << 20)
    made = [p for b in b"q=" + b"'" * 1000 for p in slow.feed(bytes([b]))]
    assert 0 < len(made) <= 24  # about two windows per stride, not one probe per byte
    capped = BodyScanner("form", 1000)
    capped.feed(b"x" * 999)
    assert not capped.over and capped.feed(b"yy") == [] and capped.over


def test_probing_leaves_ordinary_requests_alone() -> None:
    from webtorch.guard.features import head_probes

    browser = RequestView(
        "GET",
        "/products/133",
        "page=2&sort=price",
        [
            (b"host", b"shop"),
            (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0"),
            (b"accept", b"text/html,application/xhtml+xml,*/*;q=0.8"),
            (b"cookie", b"sid=abc123; _ga=GA1.1.5.6"),
            (b"referer", b"https://shop/products"),
        ],
    )
    assert head_probes(browser) == []  # nothing to probe: no extra work per request


class EarlyUpstream:
    """An upstream that answers as soon as it has a request's head (a streamed response that
    never ends) and then reads what comes: it tells whether the request body was cut."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while b"\r\n\r\n" not in self.received:
                self.received += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            while True:
                try:
                    data = conn.recv(65536)
                except ConnectionError:
                    break
                if not data:
                    break
                self.received += data
        self.closed.set()


def test_an_attack_after_the_response_began_cuts_both_sides() -> None:
    upstream = EarlyUpstream()
    cfg = wt_config.from_dict(
        {
            "upstreams": {"backend": {"servers": [f"127.0.0.1:{upstream.port}"]}},
            "routes": [{"prefix": "/api/", "upstream": "backend"}],
            "guard": {"mode": "enforce"},
        }
    )
    head = (
        b"POST /api/search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0\r\nAccept: */*\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
    )
    with serve_in_thread(cfg) as running:
        with socket.create_connection((running.host, running.port), timeout=30) as sock:
            sock.sendall(head + b"6\r\na=1&b=\r\n")
            answer = b""
            while b"hello" not in answer:  # the response has begun
                answer += sock.recv(65536)
            attack = b"q=" + quote(SQLI, safe="").encode()
            sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(attack), attack))
            while True:  # the client's response is cut short: no last chunk, then the end
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                answer += data
        assert answer.startswith(b"HTTP/1.1 200") and not answer.endswith(b"0\r\n\r\n")
        assert upstream.closed.wait(10)  # the upstream request was abandoned
        assert b"OR" not in upstream.received and b"0\r\n\r\n" not in upstream.received
