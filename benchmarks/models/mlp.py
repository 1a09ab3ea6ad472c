"""MLP: a model whose forward pass costs real compute, for the loop-vs-thread measurement.

64 inputs -> 1024 -> 1024 -> 1024 -> 8 outputs with ReLU, about 2.1 M multiply-adds per row
(the XOR example costs 24). Weights come from a fixed seed, so no weights file is needed and every
run serves the same network. Used by ``benchmarks/compute_mode.py``; serve it on its own with a
config holding ``[models.mlp] path = "benchmarks/models/mlp.py"``.
"""

import torch
from torch import nn

import webtorch

WIDTH = 1024


def make_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, 8),
    )


model = webtorch.Model(
    network=make_network,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 64))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 8))],
)
