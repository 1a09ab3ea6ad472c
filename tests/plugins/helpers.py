"""Servers with plugins: plugin files written to a temporary directory, a config around them."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import Running, serve_in_thread
from tests.proxy.test_forward import request
from webtorch import config as wt_config

__all__ = ["config", "metric", "request", "serving", "toml", "write_plugins"]

FIXED: dict[str, Any] = {"path": "/fixed", "return": 200, "body": "fixed"}


def write_plugins(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(text))


def config(
    directory: Path,
    plugins: list[dict[str, Any]],
    routes: list[dict[str, Any]] | None = None,
    upstreams: dict[str, list[str]] | None = None,
    **extra: Any,
) -> Path:
    """The config file (in ``directory``, which plugin paths are relative to)."""
    data: dict[str, Any] = {
        "server": {"limits": {"drain_timeout": 5}, **extra.pop("server", {})},
        "plugins": plugins,
        "routes": routes if routes is not None else [FIXED],
        **extra,
    }
    if upstreams:
        data["upstreams"] = {name: {"servers": s} for name, s in upstreams.items()}
    path = directory / "webtorch.toml"
    path.write_text(toml(data))
    return path


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml(data: dict[str, Any]) -> str:
    """The few shapes these configs have, as TOML: tables, arrays of tables, inline values."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines.append(f"[[{key}]]")
                lines += [f"{json.dumps(k)} = {_value(v)}" for k, v in item.items()]
        elif isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()]
        else:
            lines.insert(0, f"{json.dumps(key)} = {_value(value)}")
    return "\n".join(lines) + "\n"


@contextmanager
def serving(path: Path) -> Iterator[Running]:
    with serve_in_thread(wt_config.load(path), path) as running:
        yield running


def metric(running: Running, line_start: str) -> float:
    """The value of the /metrics line that starts with ``line_start`` (0 if none)."""
    _, _, body = request(running, "GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
