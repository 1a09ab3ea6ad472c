"""A small text pipeline for the tests: clean -> measure -> score (function stages), each
record's answer computed so a test can check it; "boom" makes clean raise, blank text makes it
reject the record; "slow:<key>" makes measure wait on a file-system-free gate (see gate.py)."""

import os

import numpy as np

import webtorch


@webtorch.stage
def clean(docs):
    out = []
    for doc in docs:
        text = doc.decode() if isinstance(doc, bytes) else str(doc)
        if text == "boom":
            raise ValueError("boom in clean")
        out.append(text.strip().lower() if text.strip() else webtorch.Reject("empty document"))
    return out


@webtorch.stage
def measure(docs):
    # pid: which process ran it (placement tests); answers do not depend on it.
    return [{"length": len(d), "words": len(d.split()), "pid": os.getpid()} for d in docs]


@webtorch.stage(takes="tensors")
def score(batch):
    return {
        "score": np.asarray(batch["length"]) * 10 + np.asarray(batch["words"]),
        "rows": np.full(len(batch["length"]), len(batch["length"])),
    }


pipeline = webtorch.Pipeline([clean, measure, score])
