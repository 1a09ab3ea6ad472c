"""Atomic training checkpoints: weights plus optimizer state in one safetensors file.

A checkpoint is ``checkpoint-{step:016d}.safetensors``, where ``step`` is the last micro-batch it
includes, i.e. its position in the write-ahead log: recovery loads it and replays the WAL from
``step + 1``. (The trainer's own counters, optimizer steps taken among them, are extra entries.)
Inside:

- tensors ``model.{key}`` (``network.state_dict()``) and ``optim.{param_id}.{key}`` (the tensors
  in ``optimizer.state_dict()["state"]``);
- metadata ``format``, ``step``, ``optimizer`` (JSON of the non-tensor state and the whole
  ``param_groups``; tuples such as Adam's betas are tagged so they come back as tuples),
  ``crc32`` (of every tensor's name and bytes) and the caller's extra entries.

safetensors and JSON rather than ``torch.save``: loading a checkpoint must never run code.

Taking a checkpoint is split in two so training barely pauses: :func:`snapshot` copies the state
between two steps on the executor thread, and :func:`write_checkpoint` writes it later, on any
thread. The write goes to a temp file that is fsynced and then renamed over the final name, and
the directory is fsynced, so a crash leaves either the whole new checkpoint or none of it. Bit rot
or a damaged disk can still corrupt a file, so :func:`load_latest` falls back to an older one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from webtorch.files import fsync_directory, write_private

logger = logging.getLogger(__name__)

FORMAT = "webtorch-checkpoint-1"
_RESERVED = frozenset({"format", "step", "optimizer", "crc32"})
_NAME = re.compile(r"checkpoint-(\d{16})\.safetensors")
_TEMP_PREFIX, _TEMP_SUFFIX = ".checkpoint-", ".tmp"
DAMAGED_SUFFIX = ".damaged"
_TUPLE = "__tuple__"  # JSON has no tuples; optimizers compare and unpack them, so keep them


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A private CPU copy of the training state, safe to write while training goes on."""

    tensors: dict[str, torch.Tensor]
    optimizer_json: str
    extra: dict[str, str] = field(default_factory=dict)
    """Metadata entries the caller adds (the trainer's counters), written with the tensors."""


@dataclass(frozen=True, eq=False)
class Checkpoint:
    step: int
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    """Ready for ``optimizer.load_state_dict``: param ids are ints, tensors are on the CPU."""
    extra: dict[str, str]


def snapshot(network: nn.Module, optimizer: torch.optim.Optimizer) -> Snapshot:
    """Copy weights and optimizer state; raises TypeError for state JSON cannot carry."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in network.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cannot checkpoint model state {key!r}: {type(value).__name__}")
        tensors[f"model.{key}"] = _copy(value)
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param_id}.{key}"] = _copy(value)
            else:
                where = f"optimizer state {param_id}.{key}"
                scalars.setdefault(str(param_id), {})[key] = _to_json(value, where)
    groups = _to_json(state["param_groups"], "optimizer param_groups")
    return Snapshot(tensors, json.dumps({"state": scalars, "param_groups": groups}))


def write_checkpoint(
    directory: Path, step: int, snap: Snapshot, extra: Mapping[str, str] | None = None
) -> Path:
    """Write ``snap`` as the checkpoint for ``step``, atomically; returns its path."""
    extra = {**snap.extra, **(extra or {})}
    if clash := _RESERVED & extra.keys():
        raise ValueError(f"reserved checkpoint metadata keys: {sorted(clash)}")
    metadata = {
        **extra,
        "format": FORMAT,
        "step": str(step),
        "optimizer": snap.optimizer_json,
        "crc32": _crc32(snap.tensors),
    }
    final = directory / f"checkpoint-{step:016d}.safetensors"
    # save_file rather than save() + write: no second in-memory copy of a large model. The
    # temporary name is the one load_latest's clean-up knows.
    write_private(
        final,
        lambda temp: safetensors.torch.save_file(snap.tensors, temp, metadata=metadata),
        prefix=_TEMP_PREFIX,
        suffix=_TEMP_SUFFIX,
    )
    return final


def load_latest(directory: Path, *, set_aside: bool = False) -> Checkpoint | None:
    """The newest checkpoint that loads and validates; damaged ones are skipped with a warning.

    With ``set_aside``, a damaged one is renamed ``<name>.damaged`` (kept as evidence): left in
    place it would count as one of the ``keep`` newest when pruning, and the WAL is kept only
    from the oldest kept checkpoint on, so a damaged one would take a real fallback's place.
    """
    if not directory.is_dir():
        return None
    for step, path in sorted(_checkpoints(directory), reverse=True):
        try:
            return _load(step, path)
        except OSError as exc:  # perhaps passing (EIO, permissions): not set aside
            logger.warning("skipping unreadable checkpoint %s: %s", path, exc)
        except (ValueError, KeyError, TypeError, SafetensorError) as exc:
            if set_aside:
                aside = path.with_name(path.name + DAMAGED_SUFFIX)
                os.replace(path, aside)
                fsync_directory(directory)
                logger.warning("damaged checkpoint %s set aside as %s: %s", path, aside.name, exc)
            else:
                logger.warning("skipping damaged checkpoint %s: %s", path, exc)
    return None


def apply(checkpoint: Checkpoint, network: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the checkpoint into ``network`` and ``optimizer`` (strictly).

    Both load_state_dict calls move tensors to the parameters' devices themselves. The optimizer
    may keep the checkpoint's tensors rather than copies, so apply a checkpoint only once.
    """
    network.load_state_dict(checkpoint.model_state, strict=True)
    optimizer.load_state_dict(checkpoint.optimizer_state)


def prune(directory: Path, keep: int = 2) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints, and temp files left by crashed writes.

    Call it from the thread that writes checkpoints, or it may delete a write in progress.
    """
    if keep < 1:
        raise ValueError("prune must keep at least one checkpoint")
    old = sorted(_checkpoints(directory))[:-keep]
    doomed = [path for _, path in old] + [
        path
        for path in directory.iterdir()
        if path.name.startswith(_TEMP_PREFIX) and path.name.endswith(_TEMP_SUFFIX)
    ]
    for path in doomed:
        path.unlink()
    if doomed:
        fsync_directory(directory)
    return doomed


def steps(directory: Path) -> list[int]:
    """The steps of the checkpoints in ``directory``, oldest first."""
    return sorted(step for step, _ in _checkpoints(directory)) if directory.is_dir() else []


def _checkpoints(directory: Path) -> Iterator[tuple[int, Path]]:
    for path in directory.iterdir():
        if m := _NAME.fullmatch(path.name):
            yield int(m[1]), path


def _load(step: int, path: Path) -> Checkpoint:
    with safe_open(path, framework="pt") as f:
        metadata: dict[str, str] = f.metadata() or {}
        names: list[str] = f.keys()  # a safe_open handle is no dict and cannot be iterated
        tensors: dict[str, torch.Tensor] = {name: f.get_tensor(name) for name in names}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"format is {metadata.get('format')!r}, not {FORMAT!r}")
    if int(metadata["step"]) != step:
        raise ValueError(f"holds step {metadata['step']}, but its name says {step}")
    if metadata.get("crc32") != _crc32(tensors):
        raise ValueError("tensor data does not match its checksum")
    optim = json.loads(metadata["optimizer"], object_hook=_from_json)
    state = {int(param_id): entries for param_id, entries in optim["state"].items()}
    model_state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition(".")
        if kind == "model":
            model_state[rest] = tensor
        elif kind == "optim":
            param_id, _, key = rest.partition(".")
            state.setdefault(int(param_id), {})[key] = tensor
        else:
            raise ValueError(f"unexpected tensor {name!r}")
    extra = {k: v for k, v in metadata.items() if k not in _RESERVED}
    optimizer_state = {"state": state, "param_groups": optim["param_groups"]}
    return Checkpoint(step, path, model_state, optimizer_state, extra)


def _crc32(tensors: Mapping[str, torch.Tensor]) -> str:
    """A checksum of every tensor's name and bytes: safetensors checks its header, not the data,
    and a checkpoint with a flipped bit must lose to an older, intact one."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(name.encode(), crc)
        data = tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        crc = zlib.crc32(data.numpy().data, crc)
    return f"{crc:08x}"


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    # A contiguous private copy: live state changes under it, and safetensors needs dense data.
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _to_json(value: object, where: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and _TUPLE not in value and all(isinstance(k, str) for k in value):
        return {k: _to_json(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"cannot checkpoint {where}: unsupported {type(value).__name__} {value!r}")


def _from_json(obj: dict[str, Any]) -> Any:
    return tuple(obj[_TUPLE]) if obj.keys() == {_TUPLE} else obj
