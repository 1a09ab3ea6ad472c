"""``[models.NAME]``: a served model, its batching, and its online training (``.train``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from webtorch.config.base import Strict
from webtorch.vocab import MAX_BATCH_ROWS, MAX_QUEUED_ROWS

# Model names become URL path segments and file names in the model directory.
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def model_paths(name: str) -> tuple[str, str]:
    """The exact paths a model is served at: its short form and its OIP infer endpoint."""
    return f"/models/{name}/predict", f"/v2/models/{name}/infer"


def train_paths(name: str) -> tuple[str, str]:
    """The exact paths a trainable model learns at: the short form and the OIP extension."""
    return f"/models/{name}/train", f"/v2/models/{name}/train"


class TrainConfig(Strict):
    """Online training of one model over HTTP; off unless ``enabled``."""

    enabled: bool = False
    max_batch: Annotated[int, Field(ge=1)] = 64  # rows merged into one optimizer step
    max_queue: Annotated[int, Field(ge=1)] = MAX_QUEUED_ROWS  # rows queued before 503
    # wal: every micro-batch is fsynced before its step and its answers; checkpoint: periodic
    # checkpoints only; none: nothing persisted.
    durability: Literal["wal", "checkpoint", "none"] = "wal"
    # Relative to the config file's directory; default: webtorch-state/<model> in the working
    # directory (the embedded default's directory may be read-only site-packages).
    state_dir: Path | None = None
    # Bound the replay after a crash: it reruns every step since the last checkpoint.
    checkpoint_every_steps: Annotated[int, Field(ge=0)] = 10000  # 0: not by steps
    checkpoint_every_seconds: Annotated[float, Field(ge=0)] = 60.0  # 0: not by time
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2  # the WAL is kept from the oldest on
    # Train requests with an Idempotency-Key header answered (and applied) once: a retry gets
    # the first answer. The newest this many keys are remembered (in checkpoints and the WAL).
    idempotency_keys: Annotated[int, Field(ge=1, le=100_000)] = 10_000
    # inference: a queued inference batch runs before a ready training step (which then waits for
    # at most one inference batch, so training slows under load but never stops); fifo: the
    # older of the two goes first.
    priority: Literal["inference", "fifo"] = "inference"


class ModelConfig(Strict):
    path: Path
    device: str = "cpu"
    # A safetensors file; None: the file beside the model with the .safetensors suffix if it
    # exists; false: start from the network's own initialisation.
    weights: Path | Literal[False] | None = None
    max_batch: Annotated[int, Field(ge=1)] = MAX_BATCH_ROWS
    max_delay: Annotated[float, Field(ge=0)] = 0.0  # seconds an idle model waits to fill a batch
    max_queue: Annotated[int, Field(ge=1)] = MAX_QUEUED_ROWS  # rows queued before 503
    compute: Literal["loop", "thread"] = "loop"
    train: TrainConfig = Field(default_factory=TrainConfig)
