"""Numbers -> the fragile model (it raises on a negative input): one bad record in a model
stage's batch must fail only its own request."""

import numpy as np

import webtorch


@webtorch.stage
def number(records):
    return [{"x": np.array([float(r)], dtype=np.float32)} for r in records]


pipeline = webtorch.Pipeline([number, webtorch.model_stage("fragile")])
