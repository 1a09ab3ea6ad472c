"""A stream model whose item has a free dimension (any number of values): JSON items only."""

import torch
from torch import nn

import webtorch


class Net(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1, keepdim=True)


model = webtorch.Model(
    network=Net,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, -1))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 1))],
    stream=webtorch.Streaming(item="x"),
)
