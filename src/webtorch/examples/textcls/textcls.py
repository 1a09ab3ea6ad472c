"""The text classifier as a pipeline: dirty page -> clean text -> hashed ids -> network -> label.

The stages are plain batch functions from ``stages.py`` (a list of rows in, one result per row
out); this file names them and puts them in order. Where each runs (event loop, threads,
processes, another server) is the TOML's business: pipeline.toml runs them in one process,
split.toml moves the function stages onto services of their own, with no change here.
"""

from typing import Any

import webtorch
from webtorch.examples.textcls import stages


@webtorch.stage
def clean(pages: list[Any]) -> list[Any]:
    # A page with no text left (only scripts, chrome or nothing) is refused by record: 422
    # naming this stage and the record, while the rest of its batch goes on.
    return [text or webtorch.Reject("no text left after cleaning") for text in stages.clean(pages)]


@webtorch.stage
def featurize(texts: list[str]) -> dict[str, Any]:
    return stages.featurize(texts)  # {"ids": int64 [rows, LENGTH]}: the model's input


@webtorch.stage(takes="tensors")
def label(outputs: dict[str, Any]) -> list[dict[str, Any]]:
    return stages.label(outputs["logits"])


pipeline = webtorch.Pipeline([clean, featurize, webtorch.model_stage("textcls"), label])
