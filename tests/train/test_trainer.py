"""The trainer on its own: training mode during a step, eval mode after, overrides respected."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from webtorch.config import TrainConfig
from webtorch.serve.model import load_model
from webtorch.train.trainer import Trainer

MODES_PY = """
import torch
from torch import nn
import webtorch

SEEN = []


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x):
        SEEN.append(("inner", self.training))
        return self.linear(x)


class Frozen(nn.Module):
    # Overrides train(), as code that keeps batch norm frozen does: it must still be called.
    calls = []

    def train(self, mode=True):
        Frozen.calls.append(mode)
        return super().train(mode)

    def forward(self, x):
        return x


class Net(nn.Module):
    def __init__(self, frozen):
        super().__init__()
        self.inner = Inner()
        self.extra = Frozen() if frozen else nn.Identity()

    def forward(self, x):
        return self.extra(self.inner(x))


model = webtorch.Model(
    network=lambda: Net({frozen}),
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 1))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 1))],
    loss=lambda out, tgt: ((out["y"] - tgt["y"]) ** 2)[:, 0],
    optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
)
"""


def trainer_for(tmp_path: Path, frozen: bool) -> Trainer:
    path = tmp_path / "modes.py"
    path.write_text(MODES_PY.replace("{frozen}", str(frozen)))
    model = load_model("modes", path)
    return Trainer(model, TrainConfig(enabled=True, durability="none"), tmp_path / "state")


def step(trainer: Trainer) -> None:
    x = np.array([[1.0]], dtype=np.float32)
    batch = trainer.batch([({"x": x}, {"y": x * 2})], [1])
    result = trainer.train_step(batch)
    assert result.errors == [None] and result.losses[0] is not None


def test_a_step_runs_in_training_mode_and_leaves_eval_mode(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, frozen=False)
    module = __import__(type(trainer.model.network).__module__)
    step(trainer)
    assert module.SEEN == [("inner", True)]
    assert not any(m.training for m in trainer.model.network.modules())


def test_a_module_overriding_train_is_called(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, frozen=True)
    frozen = trainer.model.network.extra
    step(trainer)
    assert type(frozen).calls[-2:] == [True, False]
    assert not any(m.training for m in trainer.model.network.modules())
