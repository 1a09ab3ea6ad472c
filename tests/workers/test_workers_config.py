"""``server.workers`` and ``[server.master]``: what several workers refuse to serve yet (issue
22: management), where trained models train, "auto", and the one reload check that a single
server and the master share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import XOR
from webtorch import config
from webtorch.errors import ConfigError
from webtorch.workers.master import assign


def load(text: str, tmp_path: Path) -> config.Config:
    path = tmp_path / "webtorch.toml"
    path.write_text(text)
    return config.load(path)


def test_workers_default_to_one_and_auto_is_the_usable_cores(tmp_path: Path) -> None:
    assert load("", tmp_path).server.worker_count == 1
    auto = load('[server]\nworkers = "auto"\n', tmp_path)
    assert auto.server.worker_count == len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match=r"server\.workers"):
        load("[server]\nworkers = 0\n", tmp_path)
    with pytest.raises(ConfigError, match=r"server\.master\.bogus"):
        load("[server]\nworkers = 2\n[server.master]\nbogus = 1\n", tmp_path)


def test_training_with_several_workers_is_served_one_trainer_per_model(tmp_path: Path) -> None:
    text = f"""
[server]
workers = 2

[models.xor]
path = "{XOR}"

[models.xor.train]
enabled = true

[models.other]
path = "{XOR}"

[models.other.train]
enabled = true

[models.served]
path = "{XOR}"
"""
    cfg = load(text, tmp_path)
    assert cfg.workers_problem() is None
    trained = [name for name, mc in cfg.models.items() if mc.train.enabled]
    assert assign(trained, 2) == {"xor": 0, "other": 1}
    assert assign(trained, 1) == {"xor": 0, "other": 0}


def test_management_with_several_workers_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"management endpoints .* \(issue 22; ARCHITECTURE.md"):
        load("[server]\nworkers = 2\nmanagement = true\n", tmp_path)


def test_a_reload_that_changes_the_worker_count_needs_a_restart(tmp_path: Path) -> None:
    old = load("[server]\nworkers = 2\n", tmp_path)
    new = load("[server]\nworkers = 3\n", tmp_path)
    with pytest.raises(config.RestartRequired, match=r"\[server\] workers changed"):
        config.reloaded(old, new, tmp_path / "webtorch.toml", models=[], keep_listen=False)
    same, changed = config.reloaded(
        old,
        load("[server]\nworkers = 2\ndashboard = false\n", tmp_path),
        tmp_path,
        models=[],
        keep_listen=False,
    )
    assert changed == ["dashboard"] and not same.server.dashboard
