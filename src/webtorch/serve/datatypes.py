"""Open Inference Protocol datatypes and their numpy / torch counterparts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class Datatype:
    name: str
    # numpy carrier of the raw bytes: BF16 travels as uint16 (numpy has no bfloat16), BYTES as
    # object arrays of ``bytes``.
    numpy: np.dtype[np.generic]
    torch: torch.dtype | None
    json_ok: bool = True

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize


def _dt(name: str, np_type: type[np.generic] | str, torch_type: torch.dtype | None) -> Datatype:
    return Datatype(name, np.dtype(np_type), torch_type, json_ok=name != "BF16")


DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        _dt("BOOL", np.bool_, torch.bool),
        _dt("UINT8", np.uint8, torch.uint8),
        _dt("UINT16", np.uint16, torch.uint16),
        _dt("UINT32", np.uint32, torch.uint32),
        _dt("UINT64", np.uint64, torch.uint64),
        _dt("INT8", np.int8, torch.int8),
        _dt("INT16", np.int16, torch.int16),
        _dt("INT32", np.int32, torch.int32),
        _dt("INT64", np.int64, torch.int64),
        _dt("FP16", np.float16, torch.float16),
        _dt("BF16", np.uint16, torch.bfloat16),
        _dt("FP32", np.float32, torch.float32),
        _dt("FP64", np.float64, torch.float64),
        _dt("BYTES", np.object_, None),
    )
}


def datatype(name: str) -> Datatype:
    try:
        return DATATYPES[name]
    except KeyError:
        known = ", ".join(DATATYPES)
        raise ValueError(f"unknown datatype {name!r} (known: {known})") from None


def to_torch(array: np.ndarray, dt: Datatype) -> torch.Tensor:
    """A numpy carrier array as a tensor of ``dt`` (no copy where numpy allows it)."""
    if not array.flags.writeable:
        array = array.copy()  # torch.from_numpy warns on read-only buffers (np.frombuffer views)
    tensor = torch.from_numpy(array)
    if dt.name == "BF16":
        tensor = tensor.view(torch.bfloat16)
    return tensor


def to_numpy(tensor: torch.Tensor, dt: Datatype) -> np.ndarray:
    """A tensor as the numpy carrier of ``dt``, cast to ``dt`` first if the network returned
    another dtype."""
    tensor = tensor.detach()
    if dt.torch is not None and tensor.dtype != dt.torch:
        tensor = tensor.to(dt.torch)
    tensor = tensor.cpu()
    if dt.name == "BF16":
        tensor = tensor.view(torch.uint16)
    return tensor.contiguous().numpy()
