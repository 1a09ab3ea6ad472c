"""``Expect: 100-continue`` against a real server: the interim 100 goes out only once the request
is routed, its route takes the method, and auth passes (issue 19: it went out before the route
and auth checks, inviting uploads that were then refused). A refused request gets its final 4xx
at once, without a 100, and the connection closes (RFC 9110 10.1.1)."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from tests.conftest import XOR, Running, serve_in_thread
from tests.http.test_conformance import Reader, connect, continued, wait_closed
from tests.http.test_protocol import Resp, req
from webtorch import config as wt_config

TOKEN = "expect-test-token-0123456789"
BODY = orjson.dumps({"inputs": [[0, 1]], "targets": [[1]]})


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A token, a trainable model, the management endpoints on."""
    state = tmp_path_factory.mktemp("expect") / "state"
    cfg = wt_config.from_dict(
        {
            "server": {"token": TOKEN, "management": True},
            "models": {
                "xor": {"path": str(XOR), "train": {"enabled": True, "state_dir": str(state)}}
            },
        }
    )
    with serve_in_thread(cfg) as running:
        yield running


def head(method: str, target: str, *headers: tuple[str, str]) -> bytes:
    return req(
        method,
        target,
        [
            ("Content-Type", "application/json"),
            ("Expect", "100-continue"),
            ("Content-Length", str(len(BODY))),
            *headers,
        ],
    )


def refused_without_continue(running: Running, data: bytes) -> Resp:
    """Send a head only; the final answer must come without a 100, then the close."""
    with connect(running) as sock:
        sock.sendall(data)
        [resp] = Reader(sock).read(1)
        assert resp.informational == []
        assert b"HTTP/1.1 100" not in wait_closed(sock)
    return resp


AUTH = ("Authorization", f"Bearer {TOKEN}")


@pytest.mark.parametrize(
    ("method", "target", "headers", "status"),
    [
        ("POST", "/no/such/route", (), 404),
        ("POST", "/models/nope/predict", (), 404),
        ("POST", "/v2/models/nope/infer", (), 404),
        ("POST", "/models/xor/train", (), 401),
        ("POST", "/v2/models/xor/train", (), 401),
        ("POST", "/v2/models/xor/versions/1/train", (), 401),
        ("POST", "/models/xor/train", (("Authorization", "Bearer wrong-token-0123456789"),), 401),
        ("POST", "/v2/repository/models/xor/unload", (), 401),
        ("POST", "/admin/reload", (), 401),
        ("PUT", "/models/xor/predict", (), 405),
        ("PUT", "/models/xor/train", (AUTH,), 405),
        ("GET", "/v2/repository/index", (AUTH,), 405),
    ],
)
def test_refused_request_gets_its_answer_without_100(
    guarded: Running,
    method: str,
    target: str,
    headers: tuple[tuple[str, str], ...],
    status: int,
) -> None:
    resp = refused_without_continue(guarded, head(method, target, *headers))
    assert resp.status == status
    assert "error" in resp.json()
    if status == 401:
        assert resp.headers[b"www-authenticate"].startswith(b"Bearer")


@pytest.mark.parametrize(
    ("target", "headers", "status"),
    [
        ("/models/xor/predict", (), 200),
        ("/models/xor/train", (AUTH,), 200),
        ("/v2/models/xor/train", (AUTH,), 400),  # past the checks: the (short-form) body is wrong
    ],
)
def test_accepted_request_gets_100_then_its_answer(
    guarded: Running, target: str, headers: tuple[tuple[str, str], ...], status: int
) -> None:
    with connect(guarded) as sock:
        sock.sendall(head("POST", target, *headers))
        resp = continued(sock, BODY)
    assert resp.status == status, resp.body


def test_refusal_names_the_problem_for_a_token_holder_too(guarded: Running) -> None:
    resp = refused_without_continue(guarded, head("POST", "/models/nope/train", AUTH))
    assert resp.status == 404
    assert "nope" in resp.json()["error"]
