"""For benchmarks/hotpath.py: one function stage on the loop passing records through, so the
pipeline runtime's own cost per request (queue, batch, split, encode) shows."""

import webtorch


@webtorch.stage
def identity(records):
    return records


pipeline = webtorch.Pipeline([identity])
