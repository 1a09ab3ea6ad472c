"""``webtorch serve`` loads the server and nothing else: the tools beside it (webtorch_lab,
webtorch_guardlab, webtorch_demo) and their extras' dependencies (matplotlib, tqdm) come only with
their own commands (ARCHITECTURE.md). Each test starts a real server process and reads every
module it imported from ``-X importtime`` (one stderr line per import, whichever module made it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import webtorch_harness as harness
from tests.conftest import XOR

TOOLING = (
    "webtorch_lab",
    "webtorch_guardlab",
    "webtorch_demo",
    "webtorch_harness",
    "matplotlib",
    "tqdm",
)


def _imported_by_a_start(
    config: str, tmp_path: Path, expect: str = "webtorch.http.protocol"
) -> dict[str, str]:
    """Every module the start imported, with the module that imported it ("" at the top);
    ``expect``: one it must have imported (the parse worked)."""
    command = [sys.executable, "-X", "importtime", "-m", "webtorch.cli"]
    # Ready once it prints its address: every start-up import is done by then.
    with harness.serve(toml=config, workdir=tmp_path, listen=None, command=command) as server:
        pass
    err = server.log_path.read_text()  # the whole log: importtime writes a line per import
    # importtime lists a module after those it imported, indented two spaces less than them.
    rows = []
    for row in err.splitlines():
        if row.startswith("import time:") and "|" in row and not row.endswith("| imported package"):
            name = row.rsplit("|", 1)[1]
            rows.append((len(name) - len(name.lstrip()), name.strip()))
    modules: dict[str, str] = {}
    for i, (depth, name) in enumerate(rows):
        parent = next((n for d, n in rows[i + 1 :] if d < depth), "")
        modules.setdefault(name, parent)
    assert expect in modules, err[-2000:]  # the parse worked
    return modules


def _tooling(modules: dict[str, str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in TOOLING)


@pytest.mark.timeout(180)
def test_a_proxy_only_start_imports_no_tooling(tmp_path: Path) -> None:
    modules = _imported_by_a_start(
        """
[server]
listen = "127.0.0.1:0"

[upstreams.backend]
servers = ["127.0.0.1:9"]

[[routes]]
prefix = "/"
upstream = "backend"
""",
        tmp_path,
    )
    assert "webtorch.proxy.upstream" in modules
    assert _tooling(modules) == []


@pytest.mark.timeout(180)
def test_a_model_serving_start_with_the_guard_imports_no_tooling(tmp_path: Path) -> None:
    modules = _imported_by_a_start(
        f"""
[server]
listen = "127.0.0.1:0"

[models.xor]
path = "{XOR}"

[models.xor.train]
enabled = true
state_dir = "{tmp_path / "state"}"

[guard]
mode = "enforce"
""",
        tmp_path,
    )
    assert {"webtorch.serve.executor", "webtorch.train.trainer", "webtorch.guard.core"} <= set(
        modules
    )
    # torch.hub imports tqdm when it is installed (it has a fallback when not): torch's choice,
    # not a dependency of WebTorch's.
    if modules.get("tqdm", "").startswith("torch."):
        modules = {m: p for m, p in modules.items() if m.split(".")[0] != "tqdm"}
    assert _tooling(modules) == []
