"""A windowed stream model for the tests: the sum of each axis over the last 4 items, answered
every 2nd item once 4 are in."""

import torch
from torch import nn

import webtorch


class Net(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1)


model = webtorch.Model(
    network=Net,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 4, 3))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 3))],
    stream=webtorch.Streaming(item="x", window=4, every=2),
)
