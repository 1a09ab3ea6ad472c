"""A plugin that fails to load stops the start with an error naming its file and line; a reload
(SIGHUP's path, /admin/reload) with a bad set keeps the running one; a good one swaps in."""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Running
from tests.plugins import record
from tests.plugins.helpers import config, request, serving, write_plugins
from webtorch import config as wt_config
from webtorch.app import App
from webtorch.errors import ConfigError


def _start_error(tmp_path: Path, text: str, **plugin: object) -> str:
    write_plugins(tmp_path, {"bad": text})
    path = config(tmp_path, [{"path": "bad.py", **plugin}])
    with pytest.raises(ConfigError) as caught:
        App(wt_config.load(path), path)
    return str(caught.value)


def test_a_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    message = _start_error(tmp_path, "x = 1\n\ndef broken(:\n    pass\n")
    assert f"plugins.bad: plugin {tmp_path / 'bad.py'}:3 failed to import: SyntaxError" in message


def test_an_exception_while_importing_names_file_and_line(tmp_path: Path) -> None:
    text = "import os\n\n\ndef helper():\n    return 1 / 0\n\n\nvalue = helper()\n"
    message = _start_error(tmp_path, text)
    # the innermost line of the plugin's own file
    assert f"{tmp_path / 'bad.py'}:5 failed to import: ZeroDivisionError" in message


def test_no_plugin_object(tmp_path: Path) -> None:
    assert "defines no `plugin`" in _start_error(tmp_path, "class Thing:\n    pass\n")


def test_a_phase_that_may_not_wait(tmp_path: Path) -> None:
    text = "class P:\n    async def response(self, ctx, response):\n        pass\n\nplugin = P()\n"
    message = _start_error(tmp_path, text)
    assert f"{tmp_path / 'bad.py'}:2: `response` cannot be async" in message


def test_a_misspelt_phase(tmp_path: Path) -> None:
    text = "class P:\n    def on_request(self, ctx):\n        pass\n\nplugin = P()\n"
    assert "`on_request` is not a phase; name it `request`" in _start_error(tmp_path, text)


def test_a_missing_file(tmp_path: Path) -> None:
    path = config(tmp_path, [{"path": "nowhere.py"}])
    with pytest.raises(ConfigError, match=r"plugins\.nowhere: plugin .*nowhere\.py does not exist"):
        App(wt_config.load(path), path)


def test_a_failing_startup_stops_the_start(tmp_path: Path) -> None:
    text = (
        "class P:\n    def startup(self, host):\n        raise OSError('no db')\n\nplugin = P()\n"
    )
    write_plugins(tmp_path, {"bad": text})
    path = config(tmp_path, [{"path": "bad.py"}])
    refused = pytest.raises(ConfigError, match=r"plugins\.bad: .*startup failed: OSError")
    with refused, serving(path):
        pass


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="repeats plugins"):
        wt_config.from_dict({"plugins": [{"path": "a.py"}, {"path": "x/a.py"}]})
    with pytest.raises(ConfigError, match="on_error"):
        wt_config.from_dict({"plugins": [{"path": "a.py", "on_error": "maybe"}]})
    with pytest.raises(ConfigError, match="does not start with"):
        wt_config.from_dict({"plugins": [{"path": "a.py", "routes": ["api"]}]})
    with pytest.raises(ConfigError, match=r"unknown|Extra"):
        wt_config.from_dict({"plugins": [{"path": "a.py", "colour": "red"}]})


VERSION = """
class Tag:
    def startup(self, host):
        self.tag = host.settings["tag"].encode()

    def response(self, ctx, response):
        response.headers.append((b"x-tag", self.tag))

plugin = Tag()
"""


def _reload(running: Running) -> tuple[int, bytes]:
    status, _, body = request(
        running,
        "POST",
        "/admin/reload",
        body=b"",
        headers={"Content-Type": "application/json"},
    )
    return status, body


def test_reload_swaps_the_set_and_a_bad_set_keeps_the_old(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"tag": VERSION})
    server = {"management": True}
    path = config(tmp_path, [{"path": "tag.py", "settings": {"tag": "one"}}], server=server)
    with serving(path) as running:
        assert request(running, "GET", "/fixed")[1]["x-tag"] == "one"
        # a new setting: in place when the reload answers
        config(tmp_path, [{"path": "tag.py", "settings": {"tag": "two"}}], server=server)
        status, body = _reload(running)
        assert status == 200 and b"1 plugin(s)" in body
        assert request(running, "GET", "/fixed")[1]["x-tag"] == "two"
        # a file that does not load: 400 naming it, and the running set stays
        write_plugins(tmp_path, {"broken": "plugin = (\n"})
        config(
            tmp_path,
            [{"path": "tag.py", "settings": {"tag": "three"}}, {"path": "broken.py"}],
            server=server,
        )
        status, body = _reload(running)
        assert status == 400 and b"broken.py:1 failed to import: SyntaxError" in body
        assert request(running, "GET", "/fixed")[1]["x-tag"] == "two"
        # the code itself reloads; and no plugins at all
        write_plugins(tmp_path, {"tag": VERSION.replace(b"x-tag".decode(), "x-tag2")})
        config(tmp_path, [{"path": "tag.py", "settings": {"tag": "four"}}], server=server)
        assert _reload(running)[0] == 200
        headers = request(running, "GET", "/fixed")[1]
        assert headers["x-tag2"] == "four" and "x-tag" not in headers
        config(tmp_path, [], server=server)
        assert _reload(running)[0] == 200
        headers = request(running, "GET", "/fixed")[1]
        assert "x-tag2" not in headers
        assert running.app.server is not None
        # none left: the server's own handler again
        assert running.app.server.state.handler is running.app.router


def test_sighup_reloads_the_plugins(tmp_path: Path) -> None:
    from tests.conftest import serve_process

    write_plugins(tmp_path, {"tag": VERSION})
    path = config(tmp_path, [{"path": "tag.py", "settings": {"tag": "one"}}])
    with serve_process(path) as proc:
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
        conn.request("GET", "/fixed")
        response = conn.getresponse()
        response.read()
        assert response.getheader("x-tag") == "one"
        config(tmp_path, [{"path": "tag.py", "settings": {"tag": "two"}}])
        mark = proc.log_size()
        os.kill(proc.pid, signal.SIGHUP)
        proc.wait_log("reloaded", timeout=30, after=mark)  # logged once done: no sleeping
        conn.request("GET", "/fixed")
        response = conn.getresponse()
        response.read()
        assert response.getheader("x-tag") == "two"
        conn.close()


ASYNC_START = """
import asyncio

from tests.plugins.record import note

class Tag:
    async def startup(self, host):
        await asyncio.sleep(0)  # a real wait: the swap waits for it
        self.tag = host.settings["tag"]
        if self.tag == "bad":
            raise RuntimeError("cannot start")
        note(("started", self.tag))

    def shutdown(self):
        note(("shutdown", self.tag))

    def response(self, ctx, response):
        response.headers.append((b"x-tag", self.tag.encode()))

plugin = Tag()
"""


def test_an_async_startup_defers_the_swap_and_its_failure_keeps_the_set(tmp_path: Path) -> None:
    record.clear()
    write_plugins(tmp_path, {"tag": ASYNC_START})
    server = {"management": True}
    path = config(tmp_path, [{"path": "tag.py", "settings": {"tag": "one"}}], server=server)
    with serving(path) as running:
        assert request(running, "GET", "/fixed")[1]["x-tag"] == "one"
        config(tmp_path, [{"path": "tag.py", "settings": {"tag": "two"}}], server=server)
        status, body = _reload(running)
        assert status == 200 and b"once their startup ran" in body
        # the old set shuts down once the new one is in place
        record.wait_for(lambda e: ("shutdown", "one") in e)
        assert request(running, "GET", "/fixed")[1]["x-tag"] == "two"
        config(tmp_path, [{"path": "tag.py", "settings": {"tag": "bad"}}], server=server)
        assert _reload(running)[0] == 200  # loaded; its startup fails later, logged
        assert running.app.plugins is not None
        # the failed startup is counted; the running set stays
        stats = running.app.plugins.store[("tag", "startup")]
        done = asyncio.run_coroutine_threadsafe(_settled(running.app.plugins), running.loop)
        done.result(30)
        assert stats.errors == 1
        assert request(running, "GET", "/fixed")[1]["x-tag"] == "two"
    assert ("shutdown", "two") in record.EVENTS


async def _settled(host: Any) -> None:
    """The host's pending swaps done (awaited on the server's loop)."""
    await asyncio.gather(*list(host._tasks), return_exceptions=True)


def test_webtorch_check_loads_the_plugins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from webtorch.cli import main

    write_plugins(tmp_path, {"tag": VERSION, "bad": "plugin = (\n"})
    path = config(tmp_path, [{"path": "tag.py", "order": 3, "settings": {"tag": "x"}}])
    assert main(["check", str(path)]) == 0
    assert "plugin tag (order 3): startup, response" in capsys.readouterr().out
    path = config(tmp_path, [{"path": "tag.py"}, {"path": "bad.py"}])
    assert main(["check", str(path)]) == 2
    assert f"{tmp_path / 'bad.py'}:1 failed to import: SyntaxError" in capsys.readouterr().err
