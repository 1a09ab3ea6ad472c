"""Servers with [streams] and the test stream models (models/): real sockets, the websockets
client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.conftest import Running, serve_in_thread
from webtorch import config as wt_config

MODELS = Path(__file__).resolve().parent / "models"
T = TypeVar("T")


def streams_config(streams: dict[str, Any] | None = None, **extra: Any) -> wt_config.Config:
    data: dict[str, Any] = {
        "models": {
            name: {"path": str(MODELS / f"{name}.py")} for name in ("gru", "window", "wide", "free")
        },
        "streams": streams or {},
        **extra,
    }
    return wt_config.from_dict(data)


@contextmanager
def stream_server(streams: dict[str, Any] | None = None, **extra: Any) -> Iterator[Running]:
    with serve_in_thread(streams_config(streams, **extra)) as running:
        yield running


def ws_url(running: Running, path: str) -> str:
    return f"ws://{running.host}:{running.port}{path}"


def on_loop(running: Running, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the server's loop and wait for its result (what the server holds is the
    loop's: read it there)."""

    async def call() -> T:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), running.loop).result(10)
