"""What a process placement's worker runs: it imports the pipeline file by path once, then runs
stages by name on the batches it is sent. Batches and results cross as pickles between the
server and its OWN workers (never request bytes: the server decoded those, and a worker only
ever unpickles what the server pickled). Imports only the pipeline API (spec.py): a worker
starts without numpy or torch unless the pipeline file imports them.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from webtorch.pipeline.spec import Pipeline, Stage, import_pipeline_file

_pipeline: Pipeline | None = None
_stages: dict[str, Stage] = {}


class StageFailed(Exception):
    """A stage raised in a worker; its message carries the exception's repr (the exception
    itself may not pickle)."""


def init(path: str) -> None:
    """The worker's initializer: import the pipeline file (its module state lives here)."""
    global _pipeline
    _pipeline = import_pipeline_file(Path(path))
    _stages.clear()
    _stages.update((stage.name, stage) for stage in _pipeline.stages)


def ping() -> int:
    """A warm-up call: the worker is up and has imported the file."""
    return os.getpid()


def run(stage: str, payload: bytes) -> bytes:
    """Run ``stage`` over the pickled batch; the pickled result."""
    found = _stages.get(stage)
    if found is None or found.fn is None:
        raise StageFailed(f"no function stage {stage!r} in this worker's pipeline file")
    batch: Any = pickle.loads(payload)
    try:
        result = found.fn(batch)
    except Exception as exc:
        raise StageFailed(repr(exc)) from None
    return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
