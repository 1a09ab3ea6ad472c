"""The master of several workers runs no model code and loads no server: its imports are the
config's and the standard library's (webtorch/workers/master.py). Read from ``-X importtime`` of a
real start whose workers load a model and the guard; workers are fresh interpreters without that
flag, so every import line in the log is the master's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import XOR
from tests.test_runtime_imports import _imported_by_a_start

# What a worker loads and the master must not: the server, the models' runtime, the event loop.
SERVER = (
    "torch",
    "numpy",
    "uvloop",
    "httptools",
    "prometheus_client",
    "webtorch.app",
    # Not webtorch.http.messages: the request and response types, which config.py reaches
    # through the balance policies' settings (balance/hashing.py names Headers); no I/O.
    "webtorch.http.protocol",
    "webtorch.http.server",
    "webtorch.http.client",
    "webtorch.http.router",
    "webtorch.metrics",
    "webtorch.serve",
    "webtorch.train",
    "webtorch.guard",
    "webtorch.proxy",
    "webtorch.observe",
    "webtorch.workers.worker",
)
# Settings that the config's sections are (one copy of their defaults), no I/O: the upstream
# pools' (config/upstreams.py) and their package, whose __init__ is its docstring.
SETTINGS = ("webtorch.http.client", "webtorch.http.client.settings")


@pytest.mark.timeout(180)
def test_the_master_imports_no_server_and_no_torch(tmp_path: Path) -> None:
    modules = _imported_by_a_start(
        f"""
[server]
listen = "127.0.0.1:0"
workers = 2

[models.xor]
path = "{XOR}"

[guard]
mode = "enforce"
""",
        tmp_path,
        expect="webtorch.workers.master",
    )
    loaded = sorted(
        m
        for m in modules
        if m not in SETTINGS and any(m == s or m.startswith(s + ".") for s in SERVER)
    )
    assert loaded == [], f"the master imported {loaded}"
