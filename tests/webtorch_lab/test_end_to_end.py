"""A tiny scenario end to end: simulated upstreams and generator as processes, `webtorch serve`
round robin in front, the report and its pictures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from webtorch.cli import main
from webtorch_lab import report, runner
from webtorch_lab import scenario as scenarios
from webtorch_lab.plots import plot_scenario
from webtorch_lab.procs import Pinning

TINY = """
description = "Two upstreams, WebTorch round robin."
duration = 1.5
warmup = 0.3
balancers = ["webtorch:round_robin", "webtorch:no_such_policy"]

[load]
rate = 150.0
timeout = 1.0

[[upstreams]]
name = "up"
count = 2
slots = 4
service = { median = 0.003, p99 = 0.01 }
"""


def test_tiny_scenario(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    scenario = scenarios.load(path)
    with runner.Lab(tmp_path / "work", Pinning()) as lab:
        result = lab.run_scenario(scenario, raw=tmp_path / "raw", log=lambda _: None)
    assert [s.balancer for s in result.skipped] == ["webtorch:no_such_policy"]
    assert "no_such_policy" in result.skipped[0].reason
    (run,) = result.runs
    assert run.balancer == "webtorch:round_robin"
    assert 100 < run.requests < 350  # ~225 planned
    assert run.success > 0.99
    assert sum(run.shares.values()) == pytest.approx(1.0)
    assert set(run.shares) == {"up-0", "up-1"}
    assert all(0.4 < share < 0.6 for share in run.shares.values())  # round robin
    assert run.amplification == pytest.approx(1.0, abs=0.05)
    assert 0.002 < run.percentiles[50.0] < 0.5
    assert math.isfinite(run.percentiles[99.0])
    assert (tmp_path / "raw" / "tiny" / "webtorch-round_robin" / "records.csv").exists()

    pictures = plot_scenario(result, tmp_path / "out")
    assert [p.name for p in pictures] == ["tiny-latency.png", "tiny-share.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pictures)
    md = tmp_path / "out" / "tiny.md"
    md.write_text(report.scenario_report(result, pictures, md, "webtorch lab tiny"))
    text = md.read_text()
    assert "| webtorch:round_robin |" in text and "](tiny-share.png)" in text
    assert "no_such_policy" in text
    assert "webtorch:round_robin" in report.text_table(result)


def test_cli_lists_and_rejects(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "--list"]) == 0
    assert "slow-node" in capsys.readouterr().out
    assert main(["lab"]) == 2
    assert main(["lab", "no-such-scenario"]) == 2
    assert main(["lab", "slow-node", "--balancers", "nginx:magic"]) == 2
