"""A model whose preprocess is a pipeline stage (tensors): the one-stage case, run inside the
model's batch; the same stage can head a pipeline of its own (scaled_pipe.py)."""

from torch import nn

import webtorch


@webtorch.stage(takes="tensors")
def double(batch):
    return {"x": batch["x"] * 2}


class Identity(nn.Module):
    def forward(self, x):
        return x


model = webtorch.Model(
    network=Identity,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 2))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 2))],
    preprocess=double,
)
