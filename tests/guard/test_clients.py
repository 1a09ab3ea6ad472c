"""Issue 19, items 3 and 4: who a client is. Behind trusted proxies it is the address they
forwarded for (and a ban never cuts the proxy off); keyed by a header, rotating keys neither
dodge the limits nor grow memory without bound. Fake clocks throughout."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import XOR, Running, serve_in_thread
from tests.guard.helpers import Guarded
from tests.proxy.test_forward import request
from webtorch import config as wt_config
from webtorch.config import GuardConfig
from webtorch.guard.clients import DISTINCT_LIMIT, ClientTable, shown_client
from webtorch.guard.core import ALLOW, BLOCK, THROTTLE, Guard
from webtorch.guard.features import RequestView
from webtorch.guard.shell import KEY_LIMIT
from webtorch.http.messages import HandlerResult, Pending, Request, Response, json_response

INJECTION = "q=" + quote("1' OR '1'='1", safe="")


def view() -> RequestView:
    return RequestView("GET", "/", "", [(b"host", b"h")])


def ok(request: Request) -> Response:
    return json_response({"ok": True})


def answer(result: HandlerResult) -> int:
    if isinstance(result, Pending):
        assert result.response is not None
        return result.response.status
    assert isinstance(result, Response)
    return result.status


# -- rotating keys -----------------------------------------------------------------------------


def test_rotating_keys_pay_their_address_a_token_each() -> None:
    settings = GuardConfig(
        mode="enforce", rate=5, new_keys_rate=1, new_keys_burst=10, max_clients=1000
    )
    guard = Guard(settings)
    decisions = [guard.check(view(), f"key:{i}", 100.0, "10.0.0.1") for i in range(1000)]
    assert [d.action for d in decisions[:10]] == [ALLOW] * 10
    assert {(d.action, d.reason) for d in decisions[10:]} == {(THROTTLE, "new_keys")}
    assert len(guard.clients) == 10  # a refused key takes no room
    # A known key keeps its own bucket; another address has its own allowance of new keys.
    assert guard.check(view(), "key:3", 100.0, "10.0.0.1").action == ALLOW
    assert guard.check(view(), "key:new", 100.0, "10.0.0.2").action == ALLOW
    assert guard.check(view(), "key:new2", 101.0, "10.0.0.1").action == ALLOW  # refilled


def test_a_keyed_clients_block_bans_the_key_and_fresh_keys_meet_the_address_limit() -> None:
    class Always:
        def score_one(self, view: RequestView, client: list[float]) -> tuple[float, float]:
            return 1.0, 0.0

    settings = GuardConfig(mode="enforce", ban_seconds=30, new_keys_rate=0.001, new_keys_burst=3)
    guard = Guard(settings, Always())  # type: ignore[arg-type]
    assert guard.check(view(), "key:a", 0.0, "10.0.0.1").action == BLOCK
    assert set(guard.store.bans) == {"key:a"}  # not the address: others may share it
    assert guard.check(view(), "key:a", 1.0, "10.0.0.1").reason == "banned"
    fresh = [guard.check(view(), f"key:{i}", 1.0, "10.0.0.1").reason for i in range(4)]
    assert fresh == ["injection", "injection", "new_keys", "new_keys"]


def test_the_shell_limits_rotating_keys_and_bounds_what_it_keeps() -> None:
    guard = Guard(GuardConfig(mode="enforce", rate=5, new_keys_burst=20, max_clients=100))
    guarded = Guarded(guard, ok, "header:x-api-key", clock=lambda: 100.0)
    statuses = []
    for i in range(500):
        key = b"%05d" % i + b"k" * 16_384  # a fresh 16 KB key per request
        req = Request("GET", "/", "", [(b"host", b"h"), (b"x-api-key", key)], b"", client="1.2.3.4")
        statuses.append(answer(guarded(req)))
    assert statuses[:20] == [200] * 20 and set(statuses[20:]) == {429}
    keys = guard.clients.keys()
    assert len(keys) == 20 and max(map(len, keys)) <= KEY_LIMIT + 8
    # A key is never taken for an address: "x-api-key: 1.2.3.4" is not the client at 1.2.3.4.
    spoof = Request("GET", "/", "", [(b"host", b"h"), (b"x-api-key", b"9.9.9.9")], b"")
    assert guarded.client_of(spoof) == "key:9.9.9.9"


def test_a_clients_state_stays_small_whatever_paths_it_asks_for() -> None:
    table = ClientTable()
    state = table.get("10.0.0.1", 0.0)
    for i in range(10_000):
        state.arrive(f"/scan/{i}", 0.001 * i)
    assert len(state.distinct) == DISTINCT_LIMIT
    assert sys.getsizeof(state.distinct) <= 4 * DISTINCT_LIMIT + 128  # 4 bytes a path


def test_bans_are_bounded_by_max_clients() -> None:
    guard = Guard(GuardConfig(mode="enforce", ban_seconds=60, max_clients=50))
    for i in range(1000):
        guard.ban(f"key:{i}", float(i) * 0.001)
    assert (
        len(guard.store.bans) == 50
        and "key:999" in guard.store.bans
        and "key:0" not in guard.store.bans
    )


# -- trusted proxies ---------------------------------------------------------------------------


def forwarded(client: str, xff: list[bytes]) -> Request:
    headers = [(b"host", b"h"), *((b"x-forwarded-for", v) for v in xff)]
    return Request("GET", "/", "", headers, b"", client=client)


def test_the_client_behind_trusted_proxies_is_the_rightmost_untrusted_address() -> None:
    guarded = Guarded(
        Guard(GuardConfig(mode="enforce")), ok, trusted_proxies=["127.0.0.1", "10.0.0.0/8"]
    )
    assert guarded.address_of(forwarded("127.0.0.1", [b"1.1.1.1"])) == "1.1.1.1"
    # Left of the first untrusted hop is the client's to write: never believed.
    chain = forwarded("127.0.0.1", [b"6.6.6.6, 2.2.2.2", b"10.1.1.1"])
    assert guarded.address_of(chain) == "2.2.2.2"
    assert guarded.address_of(forwarded("127.0.0.1", [b"[2001:DB8::1]:443"])) == "2001:db8::1"
    assert guarded.address_of(forwarded("127.0.0.1", [b"3.3.3.3:5555"])) == "3.3.3.3"
    assert guarded.address_of(forwarded("127.0.0.1", [b"junk, 10.2.2.2"])) == "10.2.2.2"
    assert guarded.address_of(forwarded("127.0.0.1", [])) == "127.0.0.1"
    # From anyone else, X-Forwarded-For is the sender's own claim.
    assert guarded.address_of(forwarded("8.8.8.8", [b"1.1.1.1"])) == "8.8.8.8"


def guarded_config(trusted: list[str]) -> wt_config.Config:
    return wt_config.from_dict(
        {
            "server": {"trusted_proxies": trusted},
            "models": {"xor": {"path": str(XOR)}},
            "guard": {"mode": "enforce", "ban_seconds": 600},
        }
    )


@contextmanager
def guarded_server(trusted: list[str]) -> Iterator[Running]:
    with serve_in_thread(guarded_config(trusted)) as running:
        yield running


def get(running: Running, query: str, client: str) -> int:
    status, _, _ = request(running, "GET", f"/v2?{query}", headers={"X-Forwarded-For": client})
    return status


def test_a_ban_behind_a_trusted_proxy_bans_the_forwarded_client_not_the_proxy() -> None:
    with guarded_server(["127.0.0.1"]) as running:
        assert get(running, "page=1", "1.1.1.1") == 200
        assert get(running, INJECTION, "1.1.1.1") == 403
        assert running.app.guard is not None
        assert set(running.app.guard.store.bans) == {"1.1.1.1"}
        # Everyone else behind the proxy is still served, on new connections too ...
        assert get(running, "page=1", "2.2.2.2") == 200
        # ... and the banned client gets 403 per request, not a reset at accept.
        status, _, body = request(
            running, "GET", "/v2?page=1", headers={"X-Forwarded-For": "1.1.1.1"}
        )
        assert status == 403 and b"banned" in body


def test_without_trusted_proxies_the_forwarded_header_is_not_believed() -> None:
    with guarded_server([]) as running:
        assert get(running, INJECTION, "1.1.1.1") == 403
        assert running.app.guard is not None
        assert set(running.app.guard.store.bans) == {"127.0.0.1"}
        # The peer itself is banned: reset at accept.
        with socket.create_connection((running.host, running.port), timeout=10) as sock:
            try:
                sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
                answered = sock.recv(100)
            except ConnectionResetError:
                answered = b""
            assert answered == b""


def test_the_detectors_cache_keeps_long_parts_as_digests() -> None:
    from webtorch.guard.build import DEFAULT_MODEL
    from webtorch.guard.scorer import KEY_BYTES, Scorer

    scorer = Scorer.from_file(DEFAULT_MODEL)
    views = [
        RequestView("GET", "/", "", [(b"host", b"h"), (b"x-pad", b"%05d" % i + b"p" * 30_000)])
        for i in range(20)
    ]
    alone = [scorer.score_one(v, [0.0] * 9) for v in views[:10]]
    together = scorer.score(views, [[0.0] * 9] * len(views)).tolist()
    assert max(len(raw) for _, raw in scorer._cache) <= KEY_BYTES
    for one, batch in zip(alone, together, strict=False):
        assert batch == pytest.approx(one, abs=1e-5)
    # Cached by digest, scored the same: a second pass hits.
    assert scorer.score_one(views[3], [0.0] * 9) == pytest.approx(alone[3], abs=1e-6)


def test_feedback_remembers_no_oversized_request(tmp_path: Path) -> None:
    from webtorch.guard.build import DEFAULT_MODEL
    from webtorch.guard.feedback import REMEMBER_LIMIT, Feedback
    from webtorch.guard.scorer import Scorer

    feedback = Feedback(Scorer.from_file(DEFAULT_MODEL), DEFAULT_MODEL, tmp_path / "g")
    big = RequestView("GET", "/", "", [(b"x-pad", b"p" * REMEMBER_LIMIT)])
    feedback.remember(b"id-1", big, [0.0] * 9, 0.1)
    feedback.remember(b"id-2", view(), [0.0] * 9, 0.1)
    assert list(feedback.seen) == [b"id-2"]


def test_a_client_key_is_never_shown_whole() -> None:
    """Issue 19, item 4's sibling: the dashboard and the logs show a keyed client by a short,
    non-reversible form; an address as it is."""
    key = "sk-live-0123456789abcdef0123456789abcdef"
    shown = shown_client("key:" + key)
    assert shown.startswith("key:sk-l…") and len(shown) == len("key:sk-l…") + 8
    assert key[4:] not in shown
    assert shown_client("key:" + key) == shown  # stable: the same key, the same form
    assert shown_client("key:" + key[:-1] + "0") != shown
    assert shown_client("key:abc") == "key:…" + shown_client("key:abc")[-8:]  # short: no prefix
    long_key = "key#" + "0123456789abcdef" * 2
    assert shown_client(long_key) == "key#01234567"
    assert shown_client("10.0.0.5") == "10.0.0.5"
    assert shown_client("2001:db8::1") == "2001:db8::1"
