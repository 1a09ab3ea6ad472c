"""A failing plugin: logged with its name and counted; on_error open lets the request go on,
closed answers 500 naming it; async phases time out; a crash in log changes no response."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins import record
from tests.plugins.helpers import config, metric, request, serving, write_plugins

CRASH = """
class Crash:
    def request(self, ctx):
        if ctx.header("x-crash"):
            raise RuntimeError("boom")

    def response(self, ctx, response):
        if ctx.header("x-crash-response"):
            raise RuntimeError("boom in response")
        if ctx.header("x-wrong"):
            return 42  # not a Response: counted as a failure

plugin = Crash()
"""

HANG = """
import asyncio

class Hang:
    async def request(self, ctx):
        if ctx.header("x-hang"):
            await asyncio.Event().wait()  # never set: only the timeout ends it

plugin = Hang()
"""

LOG_CRASH = """
from tests.plugins.record import note

class LogCrash:
    def log(self, ctx):
        raise ValueError("log is broken")

class After:
    def log(self, ctx):
        note(("after", ctx.status, list(ctx.errors)))

plugin = LogCrash()
"""

AFTER = """
from tests.plugins.record import note

class After:
    def log(self, ctx):
        note(("after", ctx.status, list(ctx.errors)))

plugin = After()
"""


@pytest.fixture(autouse=True)
def _clear() -> Iterator[None]:
    record.clear()
    yield
    record.clear()


def _calls(what: str, plugin: str, phase: str) -> str:
    return f'webtorch_plugin_{what}_total{{phase="{phase}",plugin="{plugin}"}}'


def test_open_lets_the_request_go_on_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_plugins(tmp_path, {"crash": CRASH})
    # routes: the /metrics scrapes below are not the plugin's
    with serving(config(tmp_path, [{"path": "crash.py", "routes": ["/fixed"]}])) as running:
        assert request(running, "GET", "/fixed", headers={"x-crash": "1"})[:3:2] == (200, b"fixed")
        status, _, body = request(running, "GET", "/fixed", headers={"x-crash-response": "1"})
        assert (status, body) == (200, b"fixed")
        assert request(running, "GET", "/fixed", headers={"x-wrong": "1"})[0] == 200
        assert metric(running, _calls("errors", "crash", "request")) == 1
        assert metric(running, _calls("errors", "crash", "response")) == 2
        assert metric(running, _calls("calls", "crash", "request")) == 3
    assert any(
        "plugin crash failed in request" in r.getMessage() and r.exc_info for r in caplog.records
    )


def test_closed_answers_500_naming_the_plugin(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"crash": CRASH})
    path = config(tmp_path, [{"path": "crash.py", "on_error": "closed"}])
    with serving(path) as running:
        status, _, body = request(running, "GET", "/fixed", headers={"x-crash": "1"})
        assert status == 500 and b"plugin 'crash' failed in its request phase" in body
        status, _, body = request(running, "GET", "/fixed", headers={"x-crash-response": "1"})
        assert status == 500 and b"plugin 'crash' failed in its response phase" in body
        status, _, body = request(running, "GET", "/fixed", headers={"x-wrong": "1"})
        assert status == 500 and b"'crash'" in body
        assert request(running, "GET", "/fixed")[0] == 200  # the server serves on


def test_async_phase_times_out_open_and_closed(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"hang": HANG, "hang2": HANG})
    path = config(
        tmp_path,
        [
            {"path": "hang.py", "timeout": 0.05, "routes": ["/fixed"]},
            {"path": "hang2.py", "timeout": 0.05, "on_error": "closed", "routes": ["/closed"]},
        ],
        routes=[
            {"path": "/fixed", "return": 200, "body": "fixed"},
            {"path": "/closed", "return": 200, "body": "closed"},
        ],
    )
    with serving(path) as running:
        status, _, body = request(running, "GET", "/fixed", headers={"x-hang": "1"})
        assert (status, body) == (200, b"fixed")  # open: it went on without the plugin
        status, _, body = request(running, "GET", "/closed", headers={"x-hang": "1"})
        assert status == 500 and b"plugin 'hang2' timed out in its request phase" in body
        assert metric(running, _calls("timeouts", "hang", "request")) == 1
        assert metric(running, _calls("timeouts", "hang2", "request")) == 1
        assert request(running, "GET", "/closed")[0] == 200


def test_a_crash_in_log_changes_nothing_and_later_plugins_still_log(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"logcrash": LOG_CRASH, "after": AFTER})
    path = config(
        tmp_path,
        [
            {"path": "logcrash.py", "on_error": "closed", "routes": ["/fixed"]},
            {"path": "after.py", "routes": ["/fixed"]},
        ],
    )
    with serving(path) as running:
        for _ in range(3):
            assert request(running, "GET", "/fixed")[0] == 200
        events = record.wait_for(lambda e: len(e) >= 3)
        assert metric(running, _calls("errors", "logcrash", "log")) == 3
    assert events[0] == ("after", 200, ["logcrash.log"])
