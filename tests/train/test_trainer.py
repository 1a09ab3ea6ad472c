"""The trainer on its own: training mode during a step, eval mode after, overrides respected;
gradients as plain ``backward`` computes them, non-finite ones refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

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


# Gradients: a finite loss can still have non-finite gradients (sqrt at 0), a parameter the loss
# never reaches keeps no gradient, and a post-accumulate-grad hook still runs.
GRADS_PY = """
import torch
from torch import nn
import webtorch

HOOKED = []


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.unused = nn.Parameter(torch.ones(1))
        if {hook}:
            self.scale.register_post_accumulate_grad_hook(lambda p: HOOKED.append(p.grad.clone()))

    def forward(self, x):
        return torch.sqrt(x * self.scale)


model = webtorch.Model(
    network=Net,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 1))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 1))],
    loss=lambda out, tgt: ((out["y"] - tgt["y"]) ** 2)[:, 0],
    optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
)
"""


def grads_trainer(tmp_path: Path, hook: bool) -> Trainer:
    path = tmp_path / f"grads_{hook}.py"
    path.write_text(GRADS_PY.replace("{hook}", str(hook)))
    model = load_model(f"grads_{hook}", path)
    return Trainer(model, TrainConfig(enabled=True, durability="none"), tmp_path / "state")


def grads_step(trainer: Trainer, *xs: float) -> list[str | None]:
    rows = [
        ({"x": np.array([[x]], dtype=np.float32)}, {"y": np.ones((1, 1), np.float32)}) for x in xs
    ]
    return trainer.train_step(trainer.batch(rows, [1] * len(xs))).errors


def reference_scale(xs: list[list[float]]) -> torch.Tensor:
    """The scale after plain zero_grad / backward / step over the batches ``xs``."""
    scale = nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([scale], lr=0.1)
    for batch in xs:
        optimizer.zero_grad()
        x = torch.tensor(batch, dtype=torch.float32).reshape(-1, 1)
        ((torch.sqrt(x * scale) - 1) ** 2)[:, 0].mean().backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return scale.detach()


@pytest.mark.parametrize("hook", [False, True])
def test_gradients_match_backward_and_non_finite_ones_are_refused(
    tmp_path: Path, hook: bool
) -> None:
    trainer = grads_trainer(tmp_path, hook)
    net = trainer.model.network
    assert grads_step(trainer, 2.0, 3.0) == [None, None]
    before = net.scale.detach().clone()
    # x = 0: the loss is finite (1.0) but d sqrt(x * scale) / d scale is 0/0.
    errors = grads_step(trainer, 0.0)
    assert errors[0] is not None and "gradients are not finite" in errors[0]
    assert torch.equal(net.scale.detach(), before)  # no step was taken
    # In a batch, the bad example is left out and the others step.
    errors = grads_step(trainer, 4.0, 0.0)
    assert errors[0] is None and errors[1] is not None
    assert torch.equal(net.scale.detach(), reference_scale([[2.0, 3.0], [4.0]]))
    assert net.unused.grad is None and torch.equal(net.unused.detach(), torch.ones(1))
    hooked = __import__(type(net).__module__).HOOKED
    # Every backward ran it: 1, 1, then 4 (together, each alone, the good one again).
    assert len(hooked) == (6 if hook else 0)


def test_optimizer_hooks_run_and_the_wrapper_is_left_out_only_without_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = trainer_for(tmp_path, frozen=False)
    optimizer = trainer.optimizer
    wrapped: list[int] = []  # torch.optim's step wrapper calls this (empty: a profiler anchor)
    monkeypatch.setattr(optimizer, "_optimizer_step_code", lambda: wrapped.append(1))
    step(trainer)
    assert wrapped == []  # no hook, no profiler: the bare step ran
    calls: list[str] = []
    pre = optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    post = register_optimizer_step_post_hook(lambda *_: calls.append("global post"))
    try:
        step(trainer)
    finally:
        pre.remove()
        post.remove()
    assert calls == ["pre", "global post"] and wrapped == [1]
    # An instance attribute replacing step (what an LR scheduler does) is called.
    plain = optimizer.step
    monkeypatch.setattr(optimizer, "step", lambda: calls.append("instance") or plain())
    step(trainer)
    assert calls[-1] == "instance" and wrapped == [1, 1]
    monkeypatch.undo()
    with torch.profiler.profile() as prof:
        step(trainer)
    assert any(e.name.startswith("Optimizer.step#SGD") for e in prof.events())
