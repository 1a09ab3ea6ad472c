"""The xor model as the first stage: records are its input rows ([a, b])."""

import webtorch

pipeline = webtorch.Pipeline([webtorch.model_stage("xor")])
