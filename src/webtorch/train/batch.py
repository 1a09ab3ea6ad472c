"""What the pipeline and the trainer pass each other for one micro-batch: its tensors and rows
(:class:`Batch`), a computed step waiting for its optimizer step (:class:`Prepared`), what the
step did per request (:class:`StepResult`), and a keyed request's remembered :data:`Answer`;
with the names its tensors take in the WAL and the row arithmetic over them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final, cast

import numpy as np

from webtorch.serve.model import TensorSpec
from webtorch.serve.wire import tensors as codecs
from webtorch.serve.wire.tensors import InputData
from webtorch.train import checkpoint as ckpt
from webtorch.train.forms import UncheckedRows

# A micro-batch's tensors by name, in memory and in its WAL record: the inputs and targets,
# and each request's row count.
INPUT: Final = "inputs."
TARGET: Final = "targets."
ROWS: Final = "rows"
# A micro-batch's idempotency keys in its WAL record (only when one of its requests has one):
# the keys' ASCII bytes one after the other, and each request's key length (0: none).
KEYS: Final = "keys"
KEY_LENGTHS: Final = "key_lengths"

Answer = tuple[int, float | None, str | None]
"""A keyed request's answer: the step after it, and its loss or the error that refused it."""


# Batch, Prepared and StepResult are written-out classes, not dataclasses, so that their
# ``__init__`` compiles (see :class:`webtorch.http.messages.Request`).


class Batch:
    """One micro-batch: ``inputs.<name>`` and ``targets.<name>`` tensors, each request's row
    count in order (``rows``; the WAL stores them as a tensor of that name beside the others:
    :func:`record_tensors`), its number in the log ``seq``, and each request's idempotency key
    (``keys``: None when no request has one)."""

    def __init__(
        self,
        tensors: dict[str, np.ndarray],
        rows: list[int],
        seq: int,
        keys: list[str | None] | None = None,
    ) -> None:
        self.tensors = tensors
        self.rows = rows
        self.seq = seq
        self.keys = keys


class Prepared:
    """A computed step waiting for its optimizer step: which requests are in it (``good``),
    their losses, and why the others were left out; ``seconds``: the time prepare took."""

    def __init__(
        self,
        batch: Batch,
        good: list[int],
        losses: list[float],
        errors: list[str | None],
        seconds: float,
    ) -> None:
        self.batch = batch
        self.good = good
        self.losses = losses
        self.errors = errors
        self.seconds = seconds


class StepResult:
    """What a step did for each request of its batch: a loss, or the error that excluded it."""

    def __init__(
        self,
        step: int,
        losses: list[float | None],
        errors: list[str | None],
        snapshot: tuple[int, ckpt.Snapshot] | None = None,
    ) -> None:
        self.step = step
        self.losses = losses
        self.errors = errors
        self.snapshot = snapshot


def record_tensors(batch: Batch) -> dict[str, np.ndarray]:
    """The tensors of the batch's WAL record: its own, each request's row count, and the
    idempotency keys if a request has one (read back by :func:`from_record`)."""
    tensors = dict(batch.tensors)
    tensors[ROWS] = np.asarray(batch.rows, dtype=np.int64)
    if batch.keys is not None:
        data = "".join(key or "" for key in batch.keys).encode("ascii")
        tensors[KEYS] = np.frombuffer(data, dtype=np.uint8)
        lengths = [len(key) if key is not None else 0 for key in batch.keys]
        tensors[KEY_LENGTHS] = np.asarray(lengths, dtype=np.int64)
    return tensors


def from_record(seq: int, record: Mapping[str, np.ndarray]) -> Batch:
    """The micro-batch a WAL record holds (see :func:`record_tensors`)."""
    tensors = dict(record)
    rows = [int(n) for n in tensors.pop(ROWS)]
    keys = pop_keys(tensors)
    return Batch(tensors, rows, seq, keys)


def pop_keys(tensors: dict[str, np.ndarray]) -> list[str | None] | None:
    """A logged micro-batch's idempotency keys (see :func:`record_tensors`), taken out of its
    tensors."""
    data = tensors.pop(KEYS, None)
    lengths = tensors.pop(KEY_LENGTHS, None)
    if data is None or lengths is None:
        return None
    raw = data.tobytes()
    keys: list[str | None] = []
    start = 0
    for length in lengths.tolist():
        keys.append(raw[start : start + length].decode("ascii") if length else None)
        start += length
    return keys


def concatenate(parts: list[InputData], spec: TensorSpec) -> np.ndarray:
    lists = 0
    for part in parts:
        if type(part) is list:
            lists += 1
    if lists == len(parts):
        array = codecs.rows_array(parts, spec)  # type: ignore[arg-type]
        if array is None:
            raise UncheckedRows
        return array
    if lists:
        raise UncheckedRows  # rows beside arrays: settle the rows first
    arrays = cast(list[np.ndarray], parts)
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def per_request(per_row: np.ndarray, rows: list[int]) -> list[float]:
    """Each request's mean loss over its rows."""
    if len(per_row) == len(rows):
        return per_row.tolist()  # type: ignore[no-any-return]
    starts = np.cumsum([0, *rows[:-1]])
    return (np.add.reduceat(per_row, starts) / np.asarray(rows)).tolist()  # type: ignore[no-any-return]


def select(
    tensors: Mapping[str, np.ndarray], rows: list[int], requests: list[int]
) -> dict[str, np.ndarray]:
    """The rows of some of a batch's requests."""
    starts = np.cumsum([0, *rows])
    index = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in requests])
    return {name: array[index] for name, array in tensors.items() if name != ROWS}


def load_answers(text: str | None) -> list[tuple[str, Answer]]:
    """The remembered answers a checkpoint holds (see :meth:`Trainer.snapshot`)."""
    if text is None:
        return []
    answers: list[tuple[str, Answer]] = []
    for key, step, loss, error in json.loads(text):
        if (
            not isinstance(key, str)
            or not isinstance(step, int)
            or not (error is None or isinstance(error, str))
        ):
            raise TypeError(f"bad remembered answer {key!r}")
        answers.append((key, (step, None if loss is None else float(loss), error)))
    return answers
