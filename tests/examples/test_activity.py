"""The activity example (src/webtorch/examples/activity): its generated streams, its trained
weights on wearers it never saw, and its client playing devices against a real server, with
labels that train the model while it serves."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import torch

from tests.conftest import serve_in_thread
from webtorch import config as wt_config
from webtorch.examples.activity.client import run
from webtorch.examples.activity.data import ACTIVITIES, RATE, Wearer, segment, stream, windows
from webtorch.serve.model import load_model

EXAMPLE = Path(__file__).resolve().parents[2] / "src" / "webtorch" / "examples" / "activity"


def test_streams_are_gaits_that_differ_by_wearer() -> None:
    rng = np.random.default_rng(0)
    samples, truth = stream(40, rng)
    assert samples.shape == (40 * RATE, 3) and truth.shape == (40 * RATE,)
    assert len(set(truth.tolist())) > 1  # activities in turn
    a, b = Wearer.random(rng), Wearer.random(rng)
    walk_a = segment("walking", 10, a, rng)
    walk_b = segment("walking", 10, b, rng)
    sit = segment("sitting", 10, a, rng)
    run_ = segment("running", 10, a, rng)
    # Gravity is always there (about 1 g of magnitude on average); motion is what differs.
    for s in (walk_a, sit, run_):
        assert 8.5 < np.linalg.norm(s, axis=1).mean() < 12.5
    assert sit.std(axis=0).sum() < walk_a.std(axis=0).sum() < run_.std(axis=0).sum()
    assert not np.allclose(walk_a.mean(axis=0), walk_b.mean(axis=0), atol=0.05)  # the pocket
    # Walking is periodic at the step frequency: its spectrum peaks between 1.4 and 2.5 Hz.
    z = walk_a[:, 2] - walk_a[:, 2].mean()
    freqs = np.fft.rfftfreq(len(z), 1 / RATE)
    peak = freqs[np.argmax(np.abs(np.fft.rfft(z)))]
    assert 1.4 < peak < 2.5


def test_the_trained_model_recognises_wearers_it_never_saw() -> None:
    loaded = load_model("activity", EXAMPLE / "activity.py")
    right = total = 0
    with torch.inference_mode():
        for x, y in windows(800, 50, seed=1234):
            probs = loaded.forward({"x": torch.from_numpy(x)})["probs"]
            right += int((probs.argmax(1).numpy() == y).sum())
            total += len(y)
    assert right / total > 0.9, right / total
    assert len(ACTIVITIES) == 4


def test_the_client_plays_devices_and_its_labels_train(tmp_path: Path) -> None:
    cfg = wt_config.load(EXAMPLE / "activity.toml")
    models = {
        "activity": cfg.models["activity"].model_copy(
            update={
                "path": EXAMPLE / "activity.py",
                "train": cfg.models["activity"].train.model_copy(
                    update={"state_dir": tmp_path / "state"}
                ),
            }
        )
    }
    server = cfg.server.model_copy(update={"listen": "127.0.0.1:0"})
    cfg = cfg.model_copy(update={"server": server, "models": models})
    with serve_in_thread(cfg) as running:
        report = asyncio.run(run(f"ws://127.0.0.1:{running.port}", 4, 12, fast=True, label_every=4))
    # 12 s each: 600 samples, answers at samples 50, 60, ... 600: 56 per device.
    assert report.items == 4 * 600 and report.answers == 4 * 56
    assert report.errors == []
    assert report.right / report.answers > 0.85
    assert report.trained == 4 * 14
