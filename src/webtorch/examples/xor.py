"""XOR: the embedded default model. Two inputs in [0, 1], one output, the probability of XOR.

Serve it with ``webtorch serve`` and ask it::

    curl -s localhost:8080/models/xor/predict -d '{"inputs": [[0, 1], [1, 1]]}'

``xor.safetensors`` beside this file holds trained weights (made by ``python -m
webtorch.examples.train_xor``); without it the network starts untrained.
"""

import torch
from torch import nn

import webtorch


class XorNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(2, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(torch.tanh(self.hidden(x))))


def bce(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    # One loss per row (WebTorch trains on their mean): each train request's own loss then
    # comes with the step at no extra cost. A scalar loss works too. view(-1) turns the (N, 1)
    # losses into N; indexing ([:, 0]) gives the same numbers through Python's slower
    # indexing path, a few microseconds of a step this small.
    return nn.functional.binary_cross_entropy(outputs["y"], targets["y"], reduction="none").view(-1)


model = webtorch.Model(
    network=XorNet,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 2))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 1))],
    loss=bce,
    # foreach=False is torch's own choice on CPU; said here, it is not worked out again at every
    # step from each parameter's device (~8 us of a step this small). For a model trained on a
    # GPU, leave it out: there torch picks its faster foreach kernels.
    optimizer=lambda params: torch.optim.SGD(params, lr=0.5, foreach=False),
)
