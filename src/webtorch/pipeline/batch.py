"""A batch in its two forms, and the conversions between them.

- records: a list, one Python value per row (a dict, str, bytes, a number, an array...);
- columns: a dict name -> numpy array or torch tensor (or a list), leading dimension = rows.

A stage declares the form it takes; the runner converts at the boundary where the forms differ:
records of dicts become columns by stacking each key, columns become records of dicts by
splitting; records that are not dicts go in and come out as one column named ``data``. A join's
batch is a :class:`Joined` dict of its inputs' batches, each converted on its own.

Batches of several requests are concatenated (:func:`concat`) and cut back into each request's
rows (:func:`split`) in the form they are in, so a conversion runs once per batch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import orjson

from webtorch.pipeline.spec import Reject, Takes

DATA: Final = "data"  # the column of records that are not dicts


class Joined(dict[str, Any]):
    """A join's batch: its inputs' batches by stage name (a dict to the stage's function)."""


class StageError(Exception):
    """A stage broke its contract (wrong rows, a form that cannot convert) or raised: the
    message names the stage."""


def _torch() -> Any:
    # torch only if something already loaded it (a tensor cannot exist otherwise): a pipeline
    # of plain Python stages never pays for importing it.
    return sys.modules.get("torch")


def _is_tensor(value: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


def rows_of(batch: Any, stage: str = "") -> int:
    """The rows of a batch in either form (or a join)."""
    if isinstance(batch, Joined):
        counts = {rows_of(part, stage) for part in batch.values()}
        if len(counts) != 1:
            raise StageError(f"stage {stage!r}: the joined inputs have different rows {counts}")
        return counts.pop()
    if isinstance(batch, list):
        return len(batch)
    if isinstance(batch, dict):
        if not batch:
            raise StageError(f"stage {stage!r} returned an empty dict (no columns)")
        counts = set()
        for name, column in batch.items():
            shape = getattr(column, "shape", None)
            if shape is not None:
                if len(shape) == 0:
                    raise StageError(f"stage {stage!r}: column {name!r} is a scalar, not rows")
                counts.add(int(shape[0]))
            elif isinstance(column, list | tuple):
                counts.add(len(column))
            else:
                raise StageError(
                    f"stage {stage!r}: column {name!r} is a {type(column).__name__}, "
                    "not an array, tensor or list"
                )
        if len(counts) != 1:
            raise StageError(f"stage {stage!r}: columns have different numbers of rows {counts}")
        return counts.pop()
    raise StageError(
        f"stage {stage!r} returned a {type(batch).__name__}: return a list (one value per row) "
        "or a dict of arrays"
    )


def _stack(values: list[Any], name: str, stage: str) -> Any:
    first = values[0]
    if isinstance(first, list | int | float):  # JSON rows and numbers: one conversion
        try:
            return np.asarray(values)
        except ValueError:
            pass  # ragged: stacking below says so
    if _is_tensor(first):
        return _torch().stack(values)
    if isinstance(first, str | bytes | dict):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    try:
        return np.stack([np.asarray(v) for v in values])
    except ValueError as exc:
        raise StageError(f"stage {stage!r}: column {name!r} cannot be stacked: {exc}") from None


def to_columns(records: list[Any], stage: str = "") -> dict[str, Any]:
    """Records as columns: dicts stacked key by key, other values as the column ``data``."""
    if not records:
        return {}
    first = records[0]
    if not isinstance(first, dict):
        return {DATA: _stack(records, DATA, stage)}
    keys = list(first)
    for i, record in enumerate(records):
        if not isinstance(record, dict) or list(record) != keys:
            raise StageError(
                f"stage {stage!r} takes tensors: record {i} is not a dict with the keys "
                f"{keys} of record 0"
            )
    return {key: _stack([r[key] for r in records], key, stage) for key in keys}


def to_records(columns: dict[str, Any], stage: str = "") -> list[Any]:
    """Columns as records: a dict per row (the column ``data`` alone: its values)."""
    rows = rows_of(columns, stage)
    if len(columns) == 1 and DATA in columns:
        return list(columns[DATA])
    items = list(columns.items())
    return [{name: column[i] for name, column in items} for i in range(rows)]


def to_form(batch: Any, takes: Takes, stage: str = "") -> Any:
    """``batch`` in the form a stage takes (a join: each input on its own)."""
    if isinstance(batch, Joined):
        return Joined({name: to_form(part, takes, stage) for name, part in batch.items()})
    if takes == "records":
        return to_records(batch, stage) if isinstance(batch, dict) else batch
    return to_columns(batch, stage) if isinstance(batch, list) else batch


def _cat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)
    if _is_tensor(first):
        return _torch().cat(parts)
    out: list[Any] = []
    for part in parts:
        out.extend(part)
    return out


def concat(pieces: Sequence[Any], takes: Takes, stage: str = "") -> Any:
    """Several requests' batches as one, in the form the stage takes."""
    if len(pieces) == 1:
        return to_form(pieces[0], takes, stage)
    first = pieces[0]
    if isinstance(first, Joined):
        return Joined({name: concat([p[name] for p in pieces], takes, stage) for name in first})
    if all(isinstance(p, list) for p in pieces):
        merged: list[Any] = []
        for piece in pieces:
            merged.extend(piece)
        return to_form(merged, takes, stage)
    if all(isinstance(p, dict) for p in pieces) and all(list(p) == list(first) for p in pieces):
        try:
            columns = {name: _cat([p[name] for p in pieces]) for name in first}
        except (ValueError, TypeError, RuntimeError):
            pass  # shapes differ past the rows: merge as records instead
        else:
            return to_form(columns, takes, stage)
    converted = [to_form(p, "records", stage) for p in pieces]
    return concat(converted, takes, stage)


def split(batch: Any, counts: Sequence[int]) -> list[Any]:
    """A batch cut into consecutive pieces of ``counts`` rows (views where the form allows)."""
    if isinstance(batch, Joined):
        parts = {name: split(part, counts) for name, part in batch.items()}
        return [Joined({name: parts[name][i] for name in parts}) for i in range(len(counts))]
    pieces: list[Any] = []
    start = 0
    for count in counts:
        end = start + count
        if isinstance(batch, list):
            pieces.append(batch[start:end])
        else:
            pieces.append({name: column[start:end] for name, column in batch.items()})
        start = end
    return pieces


def take(batch: Any, indices: Sequence[int]) -> Any:
    """The rows at ``indices`` (kept in order), in the batch's form."""
    if isinstance(batch, Joined):
        return Joined({name: take(part, indices) for name, part in batch.items()})
    if isinstance(batch, list):
        return [batch[i] for i in indices]
    picked: dict[str, Any] = {}
    for name, column in batch.items():
        if isinstance(column, list | tuple):
            picked[name] = [column[i] for i in indices]
        else:
            picked[name] = column[list(indices)]
    return picked


def rejections(batch: Any) -> list[tuple[int, Reject]]:
    """The rows a stage returned a :class:`Reject` for (only lists can hold one)."""
    if not isinstance(batch, list):
        return []
    return [(i, row) for i, row in enumerate(batch) if type(row) is Reject]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if _is_tensor(value):
        return value.detach().cpu().tolist()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"cannot answer a {type(value).__name__} as JSON")


def dumps(value: Any) -> bytes:
    """``value`` as JSON: numpy and torch values as numbers and lists, bytes as text."""
    return orjson.dumps(value, default=_json_default, option=orjson.OPT_SERIALIZE_NUMPY)
