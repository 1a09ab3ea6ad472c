"""Fan-out to two model stages and a join: parse -> (xor, frozen) -> compare."""

import numpy as np

import webtorch


@webtorch.stage
def parse(records):
    return [{"x": np.array(r, dtype=np.float32)} for r in records]


@webtorch.stage(after=("trained", "frozen"))
def compare(joined):
    # A join gets each input's rows in the form it takes (records: one dict per row).
    return [
        {"trained": round(float(a["y"][0]), 4), "frozen": round(float(b["y"][0]), 4)}
        for a, b in zip(joined["trained"], joined["frozen"], strict=True)
    ]


pipeline = webtorch.Pipeline(
    [
        parse,
        webtorch.model_stage("xor", name="trained", after=("parse",)),
        webtorch.model_stage("frozen", after=("parse",)),
        compare,
    ]
)
