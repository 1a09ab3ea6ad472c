"""A stream model with large answers (8,192 numbers per item): what fills a write buffer fast in
the backpressure test."""

import torch
from torch import nn

import webtorch


class Net(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 8192).contiguous()


model = webtorch.Model(
    network=Net,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 1))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 8192))],
    stream=webtorch.Streaming(item="x"),
)
