"""For benchmarks/hotpath.py: the xor model as a pipeline's one stage (records [a, b] in, its
rows out), against /models/xor/predict serving the same model directly."""

import webtorch

pipeline = webtorch.Pipeline([webtorch.model_stage("xor")])
