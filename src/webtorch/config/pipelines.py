"""``[pipelines.NAME]``: a pipeline file's stages served as one graph, and each stage's
placement and batching (``.stages.STAGE``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from webtorch.config.base import Strict
from webtorch.vocab import MAX_BATCH_ROWS, MAX_QUEUED_ROWS


class StageConfig(Strict):
    """[pipelines.P.stages.S]: where one stage of a pipeline runs and how it batches."""

    # loop: on the event loop (microsecond stages); thread: a pool of `workers` threads (code
    # that releases the GIL); process: a pool of `workers` processes (GIL-bound Python).
    placement: Literal["loop", "thread", "process"] = "loop"
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    max_batch: Annotated[int, Field(ge=1)] = MAX_BATCH_ROWS  # rows per batch
    max_delay: Annotated[float, Field(ge=0)] = 0.0  # seconds an idle stage waits to fill one
    max_queue: Annotated[int, Field(ge=1)] = MAX_QUEUED_ROWS  # rows queued before 503
    # An [upstreams.X] group of WebTorch servers serving this stage (`--stages S`): its batches
    # go there instead of running here.
    remote: str | None = None


class PipelineConfig(Strict):
    """[pipelines.P]: a pipeline file's stages served as one graph (pipeline/)."""

    path: Path
    stages: dict[str, StageConfig] = Field(default_factory=dict)
    max_records: Annotated[int, Field(ge=1)] = 256  # records per request
    max_record_bytes: Annotated[int, Field(ge=1)] = 1 << 20  # bytes of one record as sent
    # Seconds a request may spend in the pipeline before it answers 504 naming the stage it is
    # in (0: no limit). A stage's running batch is not interrupted: its late rows are dropped.
    timeout: Annotated[float, Field(ge=0)] = 60.0


def pipeline_paths(name: str, stages: Iterable[str] = ()) -> list[str]:
    """The exact paths a pipeline is served at (its stages' own endpoints included)."""
    return [
        f"/pipelines/{name}/predict",
        f"/pipelines/{name}/train",
        f"/v2/pipelines/{name}",
        f"/v2/pipelines/{name}/infer",
        f"/v2/pipelines/{name}/train",
        *(f"/v2/pipelines/{name}/stages/{stage}/infer" for stage in stages),
    ]
