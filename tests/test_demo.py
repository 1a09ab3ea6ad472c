"""``webtorch demo`` end to end: a real server subprocess, trained over HTTP until it knows XOR."""

from __future__ import annotations

import re
import subprocess
import sys

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
