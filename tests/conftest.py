"""Shared fixtures: real servers on port 0, in-process (a thread with its own uvloop loop) or as a
subprocess (for signals and crashes, through webtorch_harness). Both wait on readiness, never on
sleep."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

import webtorch_harness as harness
from webtorch import config as wt_config
from webtorch.app import App
from webtorch_harness import Server

ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session: pytest.Session) -> None:
    # An extension built from an older source would be what the tests exercise (see
    # webtorch/compiled.py): refuse rather than pass or fail on code that is not there.
    from webtorch import compiled

    outdated = compiled.stale()
    if outdated:
        pytest.exit(
            f"compiled modules older than their sources: {', '.join(outdated)}; run "
            "scripts/compile (or scripts/compile --clean to test the pure-Python modules)",
            returncode=2,
        )


XOR = ROOT / "src" / "webtorch" / "examples" / "xor.py"


def xor_config(**server: Any) -> wt_config.Config:
    """The XOR example as a Config; keyword arguments go to [server.limits]."""
    data: dict[str, Any] = {"models": {"xor": {"path": str(XOR)}}}
    if server:
        data["server"] = {"limits": server}
    return wt_config.from_dict(data)


@dataclass
class Running:
    app: App
    host: str
    port: int
    loop: asyncio.AbstractEventLoop

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextmanager
def serve_in_thread(cfg: wt_config.Config, path: Path | None = None) -> Iterator[Running]:
    """Run an App on 127.0.0.1:<free port> in a background thread until the block exits;
    ``path``: the config's file, for reloads."""
    app = App(cfg, path)
    loop = uvloop.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None
    failure: list[BaseException] = []

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        try:
            await app.start(host="127.0.0.1", port=0)
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        ready.set()
        await stop.wait()
        await app.stop()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    ready.wait(30)
    if failure:
        raise failure[0]
    assert app.server is not None
    host, port = app.server.addresses[0]
    try:
        yield Running(app, host, port, loop)
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


@pytest.fixture
def refused_address() -> Iterator[str]:
    """``127.0.0.1:<port>`` that refuses connections for the whole test: a socket bound there
    that never listens. (A port bound and released at once is free for the next bind to port 0,
    the test's own servers' included, which would then answer on it.)"""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def xor_server() -> Iterator[Running]:
    with serve_in_thread(xor_config()) as running:
        yield running


@contextmanager
def serve_process(config_path: Path | None = None, *extra: str) -> Iterator[Server]:
    """``webtorch serve`` as a subprocess on a free port (webtorch_harness), in a scratch working
    directory (the embedded default keeps its training state under it); ready once it prints
    its address. Stopped (SIGTERM, then SIGKILL) when the block exits."""
    with harness.serve(config_path, *extra) as server:
        yield server
