"""XOR behind a pipeline: parse text records "a,b" -> the xor model -> a label."""

import numpy as np

import webtorch


@webtorch.stage
def parse(records):
    rows = []
    for record in records:
        text = record.decode() if isinstance(record, bytes) else str(record)
        parts = text.split(",")
        if len(parts) != 2:
            rows.append(webtorch.Reject(f"want two numbers 'a,b', got {text!r}"))
            continue
        rows.append({"x": np.array([float(parts[0]), float(parts[1])], dtype=np.float32)})
    return rows


@webtorch.stage(takes="tensors")
def label(batch):
    return [{"xor": int(p > 0.5), "p": round(float(p), 4)} for p in batch["y"][:, 0]]


pipeline = webtorch.Pipeline([parse, webtorch.model_stage("xor"), label])
