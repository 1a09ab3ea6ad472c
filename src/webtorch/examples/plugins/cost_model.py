"""The cost model that ``learned_cost.py`` asks and trains: a request's features (hashed from
its method, path and headers: ``learned_cost.features``) -> the log of its expected time in
milliseconds. Served like any model (``[models.cost]``), so its predictions batch with every
other request to it and its training goes through the trainer's WAL and checkpoints."""

import torch
from torch import nn

import webtorch

FEATURES = 32


def squared(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((outputs["y"] - targets["y"]) ** 2).view(-1)  # one loss per row


model = webtorch.Model(
    network=lambda: nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 1)),
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, FEATURES))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 1))],
    loss=squared,
    optimizer=lambda params: torch.optim.Adam(params, lr=0.02),
)
