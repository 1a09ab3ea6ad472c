"""The activity classifier: a small 1D-convolutional network over the last second of a
stream (50 samples of 3 axes), served as a stream model that answers five times a second.

    webtorch serve --config src/webtorch/examples/activity/activity.toml

``activity.safetensors`` beside this file holds trained weights (``python -m
webtorch.examples.activity.train``). The network returns logits; postprocess turns them into
probabilities for the answers, while training (labels sent on the stream) sees the logits.
"""

import torch
from torch import nn

import webtorch

WINDOW = 50  # one second at 50 Hz
CLASSES = 4  # data.ACTIVITIES: sitting, walking, stairs, running


class ActivityNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(3, 24, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.Conv1d(24, 32, kernel_size=5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv1d(32, 32, kernel_size=5, stride=2, padding=2),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.transpose(1, 2) / 9.81)  # (batch, 3, 50), in g
        # Mean and max over time: how strong and how peaked the motion is.
        logits: torch.Tensor = self.head(torch.cat((h.mean(dim=2), h.amax(dim=2)), dim=1))
        return logits


def probabilities(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"probs": torch.softmax(outputs["probs"], dim=1)}


def cross_entropy(
    outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
) -> torch.Tensor:
    return nn.functional.cross_entropy(
        outputs["probs"], targets["activity"].long(), reduction="none"
    )


model = webtorch.Model(
    network=ActivityNet,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, WINDOW, 3))],
    outputs=[webtorch.TensorSpec("probs", "FP32", (-1, CLASSES))],
    postprocess=probabilities,
    stream=webtorch.Streaming(item="x", window=WINDOW, every=10),
    targets=[webtorch.TensorSpec("activity", "INT64", (-1,))],
    loss=cross_entropy,
    optimizer=lambda params: torch.optim.Adam(params, lr=1e-4),
)
