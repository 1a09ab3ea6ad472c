"""Upstream responses the proxy must not relay, from a real misbehaving upstream socket server
(``RawUpstream``: no HTTP library between the test and the bytes): oversized heads, 101
Switching Protocols, broken framing. Each is a clear 502, the upstream connection is closed
(never reused for another client's request), and the operator hears of it once."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from tests.proxy.test_forward import proxy, request
from tests.proxy.upstreams import raw_upstream, upstreams

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def once(response: bytes) -> object:
    return lambda head: [response]


def error_of(body: bytes) -> str:
    message: str = json.loads(body)["error"]
    return message


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert "Fatal error" not in record.getMessage()
        assert record.exc_info is None, record.getMessage()
        assert record.levelno < logging.ERROR, record.getMessage()


# -- 101 Switching Protocols (issue 19, item 15) -----------------------------------------------


def test_101_is_a_clear_502_and_the_upstream_connection_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
        b"\x81\x05hello"
    )
    with raw_upstream(lambda head: [switch]) as up, proxy([up.address]) as running:
        status, _, body = request(running, "GET", "/")
        assert status == 502
        assert error_of(body) == (
            f"upstream {up.address} answered 101 Switching Protocols; "
            "WebSocket proxying is not supported"
        )
        assert up.closed[0].wait(10)  # the proxy hung up on it
        # The proxy goes on serving: another request gets the same clear answer.
        assert request(running, "GET", "/")[0] == 502
    no_tracebacks(caplog)


def test_upgrade_intent_is_not_forwarded() -> None:
    with upstreams("a") as (a,), proxy([a.address]) as running:
        status, _, body = request(running, "GET", "/echo", headers={"Upgrade": "websocket"})
        assert status == 200
        sent = {k for k, _ in json.loads(body)["headers"]}
        assert "upgrade" not in sent and "connection" not in sent


# -- bounded response heads (issue 19, item 14) ------------------------------------------------


def big_header(size: int) -> Iterator[bytes]:
    yield b"HTTP/1.1 200 OK\r\nX-Big: "
    piece = b"a" * min(size, 65536)
    for _ in range(size // len(piece)):
        yield piece
    yield b"\r\nContent-Length: 2\r\n\r\nok"


def test_a_huge_response_header_is_502_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="webtorch.proxy")
    with raw_upstream(lambda head: big_header(1 << 20)) as up, proxy([up.address]) as running:
        for _ in range(3):
            status, _, body = request(running, "GET", "/")
            assert status == 502
            assert error_of(body) == (
                f"upstream {up.address} sent a response head larger than 65536 bytes "
                "(max_response_header_bytes)"
            )
        assert up.closed[0].wait(10)
    warnings = [r for r in caplog.records if "max_response_header_bytes" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # rate-limited
    no_tracebacks(caplog)


def test_an_endless_response_header_is_cut_off_early() -> None:
    """300 MB of one header: the proxy stops at the limit (before, it buffered all of it)."""
    with raw_upstream(lambda head: big_header(300 << 20)) as up, proxy([up.address]) as running:
        status, _, body = request(running, "GET", "/")
        assert status == 502 and "max_response_header_bytes" in error_of(body)
        assert up.closed[0].wait(30)
        # What the upstream managed to write: the limit plus what socket buffers hold.
        assert up.sent[0] < 32 << 20


def test_too_many_response_headers_is_502() -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(10000))
    response = head + b"Content-Length: 2\r\n\r\nok"
    with raw_upstream(lambda h: [response]) as up, proxy([up.address]) as running:
        status, _, body = request(running, "GET", "/")
        assert status == 502
        assert error_of(body) == (
            f"upstream {up.address} sent more than 100 response headers (max_response_headers)"
        )
        assert up.closed[0].wait(10)


def test_endless_interim_responses_are_bounded_too() -> None:
    def respond(head: bytes) -> Iterator[bytes]:
        for _ in range(100_000):
            yield b"HTTP/1.1 100 Continue\r\n\r\n" * 100

    with raw_upstream(respond) as up, proxy([up.address]) as running:
        status, _, body = request(running, "GET", "/")
        assert status == 502 and "max_response_header_bytes" in error_of(body)


def test_response_head_limits_are_configurable() -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(5))
    response = b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok"
    with (
        raw_upstream(lambda h: [response]) as up,
        proxy([up.address], max_response_headers=6) as running,
    ):
        assert request(running, "GET", "/")[:3:2] == (200, b"ok")
    with (
        raw_upstream(lambda h: [response]) as up,
        proxy([up.address], max_response_headers=5) as running,
    ):
        status, _, body = request(running, "GET", "/")
        assert status == 502 and "more than 5 response headers" in error_of(body)
    with (
        raw_upstream(lambda h: big_header(4096)) as up,
        proxy([up.address], max_response_header_bytes=2048) as running,
    ):
        status, _, body = request(running, "GET", "/")
        assert status == 502 and "larger than 2048 bytes" in error_of(body)


@pytest.mark.parametrize(("on", "expected"), [(None, 502), (["invalid_header"], 200)])
def test_an_invalid_response_is_retried_only_when_the_policy_says_so(
    on: list[str] | None, expected: int
) -> None:
    with (
        raw_upstream(lambda head: big_header(1 << 20)) as bad,
        raw_upstream(lambda head: [OK]) as good,
    ):
        upstream = {"policy": "round_robin", "max_fails": 0}
        if on is not None:
            upstream["retry"] = {"on": on}
        with proxy([bad.address, good.address], **upstream) as running:
            statuses = {request(running, "GET", "/")[0] for _ in range(2)}
        # Round robin: one of the two requests went to the bad upstream first.
        assert statuses == ({200, 502} if expected == 502 else {200})
        assert len(bad.requests) >= 1


# -- framing and syntax the proxy refuses (siblings) -------------------------------------------


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", ""),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n", ""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", ""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!", ""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", ""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok", ""),
        (b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 2\r\n\r\nok", ""),
        (b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", ""),
        (b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok", ""),
        (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", ""),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "other than"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nok", "other than"),
        (b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok", "invalid status code 99"),
        (b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok", "invalid status code 600"),
        (b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "HTTP/2.0"),
        (b"HTTP/0.9 200 OK\r\nContent-Length: 2\r\n\r\nok", "HTTP/0.9"),
        # Kept alive by its Connection header, as an HTTP/1.1 response is: the version is
        # still checked, after an interim 1.1 response too (the client reads it from the
        # parser unless the response's first bytes are a final HTTP/1.1 status line).
        (b"HTTP/2.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", "HTTP/2.0"),
        (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/2.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
            "HTTP/2.0",
        ),
    ],
)
def test_a_broken_response_is_502_and_its_connection_closed(
    response: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with raw_upstream(lambda head: [response]) as up, proxy([up.address]) as running:
        status, _, body = request(running, "GET", "/")
        assert status == 502
        message = error_of(body)
        assert message.startswith(f"upstream {up.address} ")
        assert reason in message
        assert up.closed[0].wait(10)
    no_tracebacks(caplog)


def test_a_body_longer_than_declared_closes_the_connection() -> None:
    """What follows a response in the same read (here a second, unasked-for response) must
    never answer the next request: the connection is closed, not pooled."""
    first = OK + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    answers = iter([first, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"])
    with raw_upstream(lambda head: [next(answers)]) as up, proxy([up.address]) as running:
        assert request(running, "GET", "/")[2] == b"ok"
        assert up.closed[0].wait(10)
        assert request(running, "GET", "/")[2] == b"second"
