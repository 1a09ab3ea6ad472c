"""The text classifier's network as a WebTorch model: hashed ids in, one logit per class out.

The pipeline (``textcls.py``) runs it as its model stage, so it keeps the model's dynamic
batching, training priority and write-ahead log. It starts untrained; train it over HTTP
(README.md beside this file).
"""

import torch
from torch import nn

import webtorch
from webtorch.examples.textcls.data import CLASSES
from webtorch.examples.textcls.stages import LENGTH, TextNet


def cross_entropy(
    outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
) -> torch.Tensor:
    # One loss per row: each train request is answered its own loss.
    return nn.functional.cross_entropy(outputs["logits"], targets["label"], reduction="none")


model = webtorch.Model(
    network=TextNet,
    inputs=[webtorch.TensorSpec("ids", "INT64", (-1, LENGTH))],
    outputs=[webtorch.TensorSpec("logits", "FP32", (-1, len(CLASSES)))],
    targets=[webtorch.TensorSpec("label", "INT64", (-1,))],
    loss=cross_entropy,
    # Adagrad: each hashed id's row is seen by few documents, and Adagrad's per-parameter step
    # sizes let those rare rows learn fast; a few dozen small steps already separate the classes.
    optimizer=lambda params: torch.optim.Adagrad(params, lr=0.5),
)
