"""Active health checks over real sockets, against misbehaving upstreams (``RawUpstream``): a
check goes through the upstream client (``http/client/fetch.py``), so the limits on a
response's head bound it as they bound proxied responses, and what is not a valid HTTP/1.x answer
fails the check instead of passing on a status line read by hand."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator

import pytest

from tests.proxy.upstreams import raw_upstream
from webtorch import config as wt_config
from webtorch.proxy.upstream import UpstreamGroup


def check_once(address: str, **health_check: object) -> tuple[str, int]:
    """One active check of a group of ``address`` alone (one failed check makes it unhealthy):
    the upstream's state after it and the failed checks counted."""

    async def main() -> tuple[str, int]:
        cfg = wt_config.from_dict(
            {
                "upstreams": {
                    "g": {
                        "servers": [address],
                        "health_check": {"fails": 1, "passes": 1, "timeout": 10, **health_check},
                    }
                }
            }
        )
        group = UpstreamGroup("g", cfg.upstreams["g"], asyncio.get_running_loop())
        try:
            await group._check(group.upstreams[0])
            return group.health.state_of(group.upstreams[0], time.monotonic()), group.stats[
                0
            ].checks_failed
        finally:
            group.close()

    return asyncio.run(main())


def endless_headers(head: bytes) -> Iterator[bytes]:
    """A valid status line, then header lines that never end (a head without bound)."""
    yield b"HTTP/1.1 200 OK\r\n"
    while True:
        yield b"x-filler: " + b"a" * 1000 + b"\r\n"


def test_a_check_against_an_endless_head_fails_at_the_head_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: the check read the status line alone ("200"), passed, and left the rest unread.
    with raw_upstream(endless_headers) as up:
        state, failed = check_once(up.address)
        assert (state, failed) == ("unhealthy", 1)
        assert up.closed[0].wait(10)  # the proxy hung up instead of reading on
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("larger than 65536 bytes (max_response_header_bytes)" in m for m in messages), (
        messages
    )


def test_the_groups_own_head_limits_apply_to_its_checks() -> None:
    many = b"HTTP/1.1 200 OK\r\n" + b"x-h: 1\r\n" * 20 + b"content-length: 0\r\n\r\n"
    with raw_upstream(lambda head: [many]) as up:
        assert check_once(up.address) == ("healthy", 0)
    cfg = wt_config.from_dict({"upstreams": {"g": {"servers": ["127.0.0.1:1"]}}})
    assert cfg.upstreams["g"].max_response_headers > 20
    # The same answer is too many headers for a group that allows 10.
    with raw_upstream(lambda head: [many]) as up:

        async def main() -> str:
            cfg = wt_config.from_dict(
                {
                    "upstreams": {
                        "g": {
                            "servers": [up.address],
                            "max_response_headers": 10,
                            "health_check": {"fails": 1, "timeout": 10},
                        }
                    }
                }
            )
            group = UpstreamGroup("g", cfg.upstreams["g"], asyncio.get_running_loop())
            try:
                await group._check(group.upstreams[0])
                return group.health.state_of(group.upstreams[0], time.monotonic())
            finally:
                group.close()

        assert asyncio.run(main()) == "unhealthy"


def endless_body(head: bytes) -> Iterable[bytes]:
    yield b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000000\r\n\r\n"
    while True:
        yield b"." * 65536


@pytest.mark.parametrize(
    ("respond", "state"),
    [
        # The status decides; the body (here endless) is not read: the connection is closed.
        (endless_body, "healthy"),
        (lambda head: [b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n"], "unhealthy"),
        # Interim heads are skipped, as for proxied requests; the final status decides.
        (
            lambda head: [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"],
            "healthy",
        ),
        # Not a response to relay, so not one to pass a check on.
        (lambda head: [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n"], "unhealthy"),
        (lambda head: [b"HTTP/2.0 200 OK\r\ncontent-length: 0\r\n\r\n"], "unhealthy"),
        (lambda head: [b"200 OK\r\n\r\n"], "unhealthy"),
    ],
)
def test_only_a_valid_answer_with_an_expected_status_passes(
    respond: Callable[[bytes], Iterable[bytes]], state: str
) -> None:
    with raw_upstream(respond) as up:
        assert check_once(up.address)[0] == state
        assert up.closed[0].wait(10)  # a check's connection is never kept
        assert up.requests[0].startswith(b"GET /health HTTP/1.1\r\n")
        assert b"connection: close" in up.requests[0]


def test_the_expected_statuses_are_the_configs() -> None:
    # [upstreams.X.health_check] is the judge's own ActiveSettings, so every setting it reads
    # can be set: here a 3xx, which the default range (200..399) passes, fails.
    redirect = [b"HTTP/1.1 302 Found\r\nlocation: /\r\ncontent-length: 0\r\n\r\n"]
    with raw_upstream(lambda head: redirect) as up:
        assert check_once(up.address)[0] == "healthy"
    with raw_upstream(lambda head: redirect) as up:
        assert check_once(up.address, expect_status=[200, 299])[0] == "unhealthy"


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        # Accepted by the config before and refused when the group was built (a crash at start).
        ({"jitter": 1.0}, "health_check.jitter: Input should be less than 1"),
        # Accepted before, and then every check failed in fetch (not a request target).
        ({"path": "/a b"}, "health_check.path: the health check path starts with '/'"),
        ({"expect_status": [300, 200]}, "health_check.expect_status: a range of statuses"),
        ({"expect_status": [200]}, "health_check.expect_status"),
        ({"expected": 200}, "health_check.expected: Extra inputs are not permitted"),
    ],
)
def test_bad_check_settings_are_config_errors_naming_the_key(
    setting: dict[str, object], problem: str
) -> None:
    group = {"servers": ["127.0.0.1:9"], "health_check": setting}
    with pytest.raises(wt_config.ConfigError, match=problem):
        wt_config.from_dict({"upstreams": {"g": group}})
