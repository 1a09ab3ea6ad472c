"""A recurrent stream model for the tests: a GRU cell over 3-axis items, its hidden state carried
by WebTorch between a stream's items, and a linear head over it."""

import torch
from torch import nn

import webtorch

HIDDEN = 8


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cell = nn.GRUCell(3, HIDDEN)
        self.head = nn.Linear(HIDDEN, 4)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.cell(x, h)
        return self.head(h), h


model = webtorch.Model(
    network=Net,
    inputs=[
        webtorch.TensorSpec("x", "FP32", (-1, 3)),
        webtorch.TensorSpec("h", "FP32", (-1, HIDDEN)),
    ],
    outputs=[
        webtorch.TensorSpec("y", "FP32", (-1, 4)),
        webtorch.TensorSpec("h_next", "FP32", (-1, HIDDEN)),
    ],
    stream=webtorch.Streaming(item="x", state=("h", "h_next")),
    # Labels train the head and the cell one item at a time (the state comes in as an input).
    targets=[webtorch.TensorSpec("y", "FP32", (-1, 4))],
    loss=lambda out, tgt: ((out["y"] - tgt["y"]) ** 2).mean(dim=1),
    optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
)
