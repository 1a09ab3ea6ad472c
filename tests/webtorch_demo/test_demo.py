"""``webtorch demo`` end to end: a real server subprocess, trained over HTTP until it knows XOR."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import XOR, serve_in_thread
from webtorch import config as wt_config

# One table row: input, truth, prediction, rounded (then a mark).
_ROW = re.compile(r"^\s*\[([01]), ([01])\]\s+([01])\s+(\d\.\d{4})\s+([01])\b", re.MULTILINE)


def test_demo_learns_xor() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "webtorch.cli", "demo", "--clients", "8", "--max-seconds", "60"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, report
    rows = [m.groups() for m in _ROW.finditer(proc.stdout)]
    assert [(int(a), int(b)) for a, b, *_ in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)], report
    assert [int(truth) for _, _, truth, _, _ in rows] == [0, 1, 1, 0], report
    assert [round(float(p)) for *_, p, _ in rows] == [0, 1, 1, 0], report
    assert [int(rounded) for *_, rounded in rows] == [0, 1, 1, 0], report
    summary = re.search(r"(\d+) train requests from 8 clients, (\d+) optimizer steps", proc.stdout)
    assert summary is not None, report
    assert int(summary[1]) >= int(summary[2]) > 0, report


def test_demo_trains_a_running_server_that_needs_a_token(tmp_path: Path) -> None:
    """``--url``: the README's way to watch XOR train on the dashboard of the first command's
    server. ``--watch`` keeps training after XOR is learned, up to --max-requests."""
    token = "demo-token-0123456789"
    cfg = wt_config.from_dict(
        {
            "server": {"token": token},
            "models": {
                "xor": {"path": str(XOR), "train": {"enabled": True, "state_dir": str(tmp_path)}}
            },
        }
    )
    with serve_in_thread(cfg) as running:
        base = [sys.executable, "-m", "webtorch.cli", "demo", "--url", running.url]
        refused = subprocess.run(
            [*base, "--clients", "2"], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 1 and "401" in refused.stderr, refused.stderr
        proc = subprocess.run(
            [*base, "--token", token, "--clients", "4", "--watch", "--max-requests", "400"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-3000:]}"
        assert f"watch at {running.url}/dashboard" in proc.stdout
        steps = running.app.metrics.training["xor"].steps
        assert steps > 0
        summary = re.search(r"(\d+) train requests from 4 clients", proc.stdout)
        assert summary is not None and int(summary[1]) >= 400  # --watch went on after learning
