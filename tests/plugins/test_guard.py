"""Plugins beside the guard, itself the first plugin: its refusals reach the others' log; with an
async plugin after it on a proxied route (the request runs as a task) the guard's stream-mode
request_body still scans a streamed body and refuses an attack mid-upload, and a stream-mode
plugin after it reads what it let through."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.guard.test_bodies import FORM, SQLI, upload
from tests.plugins import record
from tests.plugins.helpers import config, metric, request, serving, write_plugins
from tests.proxy.upstreams import upstreams

ASYNC_LOG = """
import asyncio

from tests.plugins.record import note

class Watch:
    async def request(self, ctx):
        await asyncio.sleep(0)

    def log(self, ctx):
        note((ctx.status, ctx.guard_action))

plugin = Watch()
"""


@pytest.fixture(autouse=True)
def _clear() -> Iterator[None]:
    record.clear()
    yield
    record.clear()


def test_the_guard_scans_a_streamed_body_behind_an_async_plugin(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"watch": ASYNC_LOG})
    head = (
        b"POST /api/search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0\r\nAccept: */*\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
    )
    padding = [b"a=" + b"x" * 20_000 + b"&"] + [b"b=" + b"y" * 20_000 + b"&"] * 2
    tail = [b"q=1%27%20OR%20", b"%271%27%3D%271"]
    with upstreams("up") as (up,):
        path = config(
            tmp_path,
            [{"path": "watch.py"}],
            routes=[{"prefix": "/api/", "upstream": "backend"}],
            upstreams={"backend": [up.address]},
            guard={"mode": "enforce"},
        )
        with serving(path) as running:
            started = functools.partial(up.wait_for_hits, "/api/search", 1)
            answer = upload(running, head, padding, tail, started)
            assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
            assert up.wait_disconnects(1)  # abandoned mid-body
            answer = upload(running, head, [*padding, b"q=1 or maybe 2"])
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            # a refusal at the head: the plugins' log sees it with the guard's action
            query = "/api/search?q=" + quote(SQLI, safe="")
            assert request(running, "POST", query, b"a=1", FORM)[0] == 403
            events = record.wait_for(lambda e: len(e) >= 3)
    assert events[0] == (403, "block")
    assert events[1][0] == 200
    assert events[2] == (403, "block")


STREAM_COUNT = """
from tests.plugins.record import note

class Count:
    def __init__(self):
        self.seen = 0

    def request_body(self, ctx, chunk, end):
        self.seen += len(chunk)
        if end:
            note(("read", self.seen))
            self.seen = 0

plugin = Count()
"""


def test_a_stream_mode_plugin_reads_what_the_guard_let_through(tmp_path: Path) -> None:
    """Behind the guard's scan, a stream-mode request_body plugin still sees every chunk of a
    clean body (the check that the guard had not refused it once compared two bound methods by
    identity, which is never true, so such a plugin saw nothing behind the guard)."""
    write_plugins(tmp_path, {"count": STREAM_COUNT})
    head = (
        b"POST /api/search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0\r\nAccept: */*\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
    )
    chunks = [b"a=" + b"x" * 20_000 + b"&", b"q=1 or maybe 2"]
    with upstreams("up") as (up,):
        path = config(
            tmp_path,
            [{"path": "count.py", "body": "stream"}],
            routes=[{"prefix": "/api/", "upstream": "backend"}],
            upstreams={"backend": [up.address]},
            guard={"mode": "enforce"},
        )
        with serving(path) as running:
            answer = upload(running, head, chunks)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            events = record.wait_for(lambda e: len(e) >= 1)
    assert events[0] == ("read", sum(len(c) for c in chunks))


NOTE_REQUESTS = """
from tests.plugins.record import note

class Seen:
    def request(self, ctx):
        note(("request", ctx.query))

    def log(self, ctx):
        note(("log", ctx.status, ctx.guard_action))

plugin = Seen()
"""


# No ban after a block: the test's one client goes on asking after its attack (an operator's
# reloads bear the token, which the guard lets through: the client looks abusive by then).
GUARD = {"mode": "enforce", "ban_seconds": 0}
TOKEN = "a-management-token-for-tests"
JSON = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}


def test_the_guard_runs_first_counts_as_a_plugin_and_stays_across_reloads(
    tmp_path: Path,
) -> None:
    write_plugins(tmp_path, {"seen": NOTE_REQUESTS})
    server = {"management": True, "token": TOKEN}
    # order -100: still after the guard, which is the server's own
    plugins = [{"path": "seen.py", "order": -100}]
    path = config(tmp_path, plugins, guard=GUARD, server=server)
    attack = "/fixed?q=" + quote("1' OR '1'='1", safe="")
    calls = 'webtorch_plugin_calls_total{phase="request",plugin="guard"}'
    with serving(path) as running:
        assert request(running, "GET", "/fixed?q=shoes")[0] == 200
        assert request(running, "GET", attack)[0] == 403
        events = record.wait_for(lambda e: sum(1 for x in e if x[0] == "log") >= 2)
        assert [e for e in events if e[0] == "request"] == [("request", "q=shoes")]
        assert ("log", 403, "block") in events
        before = metric(running, calls)
        assert before >= 2
        # A reload without user plugins keeps the guard, first, its counters going on.
        config(tmp_path, [], guard=GUARD, server=server)
        status, _, body = request(running, "POST", "/admin/reload", body=b"", headers=JSON)
        assert status == 200, body
        assert request(running, "GET", attack.replace("1", "2"))[0] == 403
        assert metric(running, calls) > before
        # No configured plugin may take its name: the reload fails, the running set stays.
        config(
            tmp_path,
            [{"path": "seen.py", "name": "guard"}],
            guard=GUARD,
            server=server,
        )
        status, _, body = request(running, "POST", "/admin/reload", body=b"", headers=JSON)
        assert status == 400 and b"'guard' is the server's own" in body
        assert [p.name for p in running.app.plugins.plugins.plugins] == ["guard"]
