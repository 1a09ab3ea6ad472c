"""The model's preprocess stage as a pipeline stage of its own, before the plain model."""

import numpy as np

import webtorch


@webtorch.stage(takes="tensors")
def double(batch):
    return {"x": np.asarray(batch["x"], dtype=np.float32) * 2}


pipeline = webtorch.Pipeline([double, webtorch.model_stage("plain")])
