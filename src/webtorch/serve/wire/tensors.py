"""What every wire form shares: a decoded request, JSON data to numpy arrays checked against a
model's :class:`TensorSpec`, the precomputed checks of the fast paths, and outputs made ready for
JSON. The forms themselves: :mod:`.short` (the short form), :mod:`.oip_json` (the Open Inference
Protocol's JSON document) and :mod:`.oip_binary` (its binary tensor data extension).

Decoding raises ``BadRequest`` naming the problem. It produces numpy arrays, not tensors: the batch
builds one tensor from all requests' arrays, so there is no per-request ``torch.tensor``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypeAlias

import numpy as np
import orjson

from webtorch.errors import BadRequest, UnsupportedMediaType
from webtorch.http.messages import JSON
from webtorch.serve.datatypes import Datatype
from webtorch.serve.model import TensorSpec

# curl -d sends form-urlencoded and many clients send text/plain: both are accepted as JSON so a
# first `curl` works; anything clearly not JSON is refused with 415.
JSON_TYPES: Final = frozenset({b"", JSON, b"application/x-www-form-urlencoded", b"text/plain"})
NUMPY_OPTS: Final = orjson.OPT_SERIALIZE_NUMPY


# A decoded input: an array, or (short form, fixed-width float rows) the JSON rows themselves.
# Declared an alias: a wheel's isolated build type-checks without numpy (setup.py), where an
# undeclared one would be a variable of type Any, not a type.
InputData: TypeAlias = np.ndarray | list[Any]


class Decoded:
    """A decoded request: arrays keyed by input name, all with the same batch size ``rows``.
    (Not a dataclass, so that its ``__init__`` compiles: see
    :class:`webtorch.http.messages.Request`.)"""

    def __init__(
        self,
        inputs: dict[str, InputData],
        rows: int,
        id: str | None = None,
        requested: list[str] | None = None,
        binary: frozenset[str] | set[str] = frozenset(),
        binary_default: bool = False,
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.id = id
        # Output names to return (None: all) and which of them go back as binary data.
        self.requested = requested
        # A frozenset until some output asks for binary (no set allocated per plain request).
        self.binary = binary
        self.binary_default = binary_default


def check_json_content_type(content_type: bytes) -> None:
    if content_type not in JSON_TYPES and not content_type.endswith(b"+json"):
        raise UnsupportedMediaType(
            f"unsupported content type {content_type.decode('latin-1')!r}; "
            "send application/json (or the binary tensor extension)"
        )


def shown(value: Any) -> str:
    """A client's value for an error message, bounded in size and in the work it costs: an error
    must not echo (or even repr) megabytes."""
    if isinstance(value, str):
        return repr(value[:64]) + ("..." if len(value) > 64 else "")
    if isinstance(value, dict):
        return f"an object of {len(value)} entries"
    if isinstance(value, list):
        if len(value) <= 8 and all(v is None or isinstance(v, (bool, int, float)) for v in value):
            return repr(value)
        return f"a list of {len(value)} items"
    return repr(value)  # None, a bool or a number (orjson bounds integers to 64 bits)


def parse_json(body: bytes, what: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None


def json_array(name: str, data: Any, dt: Datatype, kind: str = "input") -> np.ndarray:
    """Nested or flat JSON data as an array of ``dt``; numbers (or booleans for BOOL) only."""
    if dt.name == "BYTES":
        return _bytes_array(name, data, kind)
    if not dt.json_ok:
        raise BadRequest(f"{kind} {name!r}: {dt.name} tensors must use the binary data extension")
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError):
        raise BadRequest(f"{kind} {name!r}: data is ragged or not numeric") from None
    found = raw.dtype.kind
    if found not in "biuf" or (found == "b" and dt.name != "BOOL"):
        raise BadRequest(f"{kind} {name!r}: data must be {dt.name} numbers")
    if found == "f" and dt.numpy.kind in "iu" and not np.all(np.mod(raw, 1) == 0):
        raise BadRequest(f"{kind} {name!r}: {dt.name} data must be integers, not fractions")
    if raw.dtype != dt.numpy:
        if dt.numpy.kind in "iu":
            # Not astype: numpy infers float64 for [0, 2**64 - 1] (precision lost) and astype
            # wraps out-of-range values; converting the JSON values directly checks the range.
            try:
                raw = np.array(data, dtype=dt.numpy)
            except (OverflowError, ValueError, TypeError):
                raise BadRequest(f"{kind} {name!r}: values out of range for {dt.name}") from None
        else:
            narrowed = _narrow(raw, dt.numpy)
            if narrowed is None:
                raise BadRequest(f"{kind} {name!r}: values out of range for {dt.name}")
            raw = narrowed
    return raw


def _narrow(array: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray | None:
    """``array`` as ``dtype``; None where a float overflows it (1e39 is inf in FP32): an infinite
    input is never what a client meant, and in training it would turn the weights into NaN."""
    if dtype.kind != "f" or array.dtype.kind != "f" or array.dtype.itemsize <= dtype.itemsize:
        return array.astype(dtype, copy=False)
    with np.errstate(over="ignore"):
        narrowed = array.astype(dtype)
    return narrowed if bool(np.isfinite(narrowed).all()) else None


def _bytes_array(name: str, data: Any, kind: str = "input") -> np.ndarray:
    flat, shape = _flatten(name, data, kind)
    out = np.empty(len(flat), dtype=object)
    for i, item in enumerate(flat):
        if not isinstance(item, str):
            raise BadRequest(f"{kind} {name!r}: BYTES data must be strings")
        out[i] = item.encode()
    return out.reshape(shape)


def _flatten(name: str, data: Any, kind: str = "input") -> tuple[list[Any], tuple[int, ...]]:
    """Nested lists as flat leaves and their shape, level by level: no recursion (orjson admits
    1024 levels, more than Python's stack), and the nesting's shape survives for the short form."""
    level = [data]
    shape: list[int] = []
    while level and isinstance(level[0], list):
        width = len(level[0])
        if any(not isinstance(item, list) or len(item) != width for item in level):
            raise BadRequest(f"{kind} {name!r}: data is ragged")
        shape.append(width)
        if len(shape) > 32:  # numpy's limit is 32 (1.x) or 64 dimensions
            raise BadRequest(f"{kind} {name!r}: data is nested more than 32 levels deep")
        level = [leaf for item in level for leaf in item]
    if any(isinstance(item, list) for item in level):
        raise BadRequest(f"{kind} {name!r}: data is ragged")
    return level, tuple(shape)


def check_shape(spec: TensorSpec, shape: tuple[int, ...], kind: str = "input") -> None:
    expected = spec.shape
    if len(shape) != len(expected) or any(
        e != -1 and e != s for e, s in zip(expected, shape, strict=True)
    ):
        raise BadRequest(
            f"{kind} {spec.name!r}: shape {list(shape)} does not match the model's {list(expected)}"
        )


def spec_for(
    specs: dict[str, TensorSpec], name: Any, model: str, kind: str = "input"
) -> TensorSpec:
    spec = specs.get(name) if isinstance(name, str) else None
    if spec is None:
        raise BadRequest(
            f"unknown {kind} {shown(name)} for model {model!r}; expected {', '.join(specs)}"
        )
    return spec


def rows_of(
    tensors: Mapping[str, InputData], specs: dict[str, TensorSpec], model: str, kind: str = "input"
) -> int:
    """The batch size shared by all of a request's tensors; BadRequest if any is missing."""
    missing = [n for n in specs if n not in tensors]
    if missing:
        raise BadRequest(f"model {model!r} needs {kind}(s) {', '.join(missing)}")
    sizes = {len(a) for a in tensors.values()}
    if len(sizes) != 1:
        raise BadRequest(f"all {kind}s must have the same batch size (first dimension)")
    rows = sizes.pop()
    if rows < 1:
        raise BadRequest(f"{kind}s have an empty batch dimension")
    return int(rows)


class TensorCheck:
    """One input's validation, precomputed for the hot paths. :meth:`array` returns None for
    anything unusual, and the caller then falls back to the general decoder, which words the
    error; so the fast path never has to."""

    __slots__ = ("datatype", "fast", "fixed", "kinds", "name", "ndim", "numpy", "width")

    def __init__(self, spec: TensorSpec) -> None:
        dt = spec.dtype
        self.name = spec.name
        self.datatype = spec.datatype
        self.numpy = dt.numpy
        self.kinds = "biuf" if dt.name == "BOOL" else "iuf"
        self.fast = dt.json_ok and dt.name != "BYTES"
        self.ndim = len(spec.shape)
        self.fixed = tuple((i, d) for i, d in enumerate(spec.shape) if i and d != -1)
        # Rows of a fixed width, for a float tensor: requests may stay JSON lists until the batch
        # converts them all at once (see ``rows_array``); None where that shortcut does not apply.
        self.width = (
            spec.shape[1]
            if len(spec.shape) == 2 and spec.shape[1] != -1 and dt.numpy.kind == "f"
            else None
        )

    def array(self, data: Any) -> np.ndarray | None:
        """JSON ``data`` as an array of this input's dtype, any shape; None if not plain numbers."""
        if not self.fast or type(data) is not list:
            return None
        try:
            array = np.asarray(data)
        except (ValueError, TypeError):
            return None
        if array.dtype.kind not in self.kinds:
            return None
        if array.dtype != self.numpy:
            if self.numpy.kind in "iu":
                # astype wraps out-of-range integers (and numpy infers float64 for [0, 2**64 - 1]):
                # only in-range integers take the fast path; the general decoder words the rest.
                if array.dtype.kind not in "iu" or array.size == 0:
                    return None
                info = np.iinfo(self.numpy.name)
                if array.min() < info.min or array.max() > info.max:
                    return None
            return _narrow(array, self.numpy)
        return array

    def shape_ok(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != self.ndim or shape[0] < 1:
            return False
        for axis, size in self.fixed:  # noqa: SIM110 - a loop: all() of a generator costs more
            if shape[axis] != size:
                return False
        return True


def rows_array(parts: list[list[Any]], spec: TensorSpec) -> np.ndarray | None:
    """Several requests' JSON rows as one array of the spec's dtype, converted in one call; None
    when any element is not a plain number, so the caller converts request by request with
    :func:`strict_array` and answers the bad ones 400. The spec is 2-D of a fixed width and every
    row is a list of that width (the decoders' fast paths check it).

    The numbers go to numpy as one flat list: numpy converts a flat list of 110 numbers in
    ~2.8 us here but 55 rows of two in ~7.5 us (it discovers the shape and dtype row by row), and
    the flattening costs less than the difference."""
    width = spec.shape[1]  # positive: TensorSpec checks
    values = [value for part in parts for row in part for value in row]
    try:
        array = np.array(values)
    except (ValueError, TypeError):
        return None
    # A nested list among the numbers makes numpy fail (ragged) or add a dimension.
    if array.dtype.kind not in "iuf" or array.ndim != 1:
        return None
    return _narrow(array.reshape(-1, width), spec.dtype.numpy)


def strict_array(spec: TensorSpec, data: Any, kind: str = "input") -> np.ndarray:
    """One request's JSON data for ``spec``, fully checked; raises BadRequest naming the problem."""
    array = json_array(spec.name, data, spec.dtype, kind)
    check_shape(spec, array.shape, kind)
    return array


def plain_output(outputs: list[TensorSpec]) -> bool:
    """One output that orjson serialises straight from numpy."""
    return len(outputs) == 1 and outputs[0].datatype not in ("BF16", "BYTES", "FP16")


def loads_or_none(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def json_ready(array: np.ndarray, dt: Datatype) -> Any:
    """An output array in a form orjson serialises (numpy directly where it can)."""
    if dt.name == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if dt.name == "BYTES":
        return [_text(v) for v in array.ravel()]
    if dt.name == "FP16":
        return array.astype(np.float32)
    return array


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
