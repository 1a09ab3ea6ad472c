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
    # comes with the step at no extra cost. A scalar loss works too.
    return nn.functional.binary_cross_entropy(outputs["y"], targets["y"], reduction="none")[:, 0]


model = webtorch.Model(
    network=XorNet,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 2))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 1))],
    loss=bce,
    optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
)
