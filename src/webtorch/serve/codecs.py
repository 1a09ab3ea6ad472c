"""Tensor codecs: request bodies to numpy arrays and output arrays to response bodies.

Two wire forms:
- the Open Inference Protocol (KServe v2) JSON body, with the binary tensor data extension
  (``Inference-Header-Content-Length``: a JSON header followed by raw tensor bytes);
- the short form for humans: ``{"inputs": [[0, 1]]}`` -> ``{"outputs": [[...]]}`` (a dict keyed by
  tensor name when a model has several).

Decoding validates against the model's :class:`TensorSpec`s and raises ``BadRequest`` naming the
problem. It produces numpy arrays, not tensors: the batch builds one tensor from all requests'
arrays, so there is no per-request ``torch.tensor``. Binary inputs are zero-copy views of the body.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from math import prod
from typing import Any, Final, TypeAlias

import numpy as np
import orjson

from webtorch.errors import BadRequest, UnsupportedMediaType
from webtorch.http.messages import JSON, Response
from webtorch.serve.datatypes import DATATYPES, Datatype
from webtorch.serve.model import TensorSpec

OCTET: Final = b"application/octet-stream"
# curl -d sends form-urlencoded and many clients send text/plain: both are accepted as JSON so a
# first `curl` works; anything clearly not JSON is refused with 415.
JSON_TYPES: Final = frozenset({b"", JSON, b"application/x-www-form-urlencoded", b"text/plain"})
_NUMPY_OPTS: Final = orjson.OPT_SERIALIZE_NUMPY
# Bounds on what one request may ask for, checked before the work they would cost (a request
# naming one output a million times, or a million BYTES elements for a shape of four, is refused
# at the count, not after the work).
MAX_ID: Final = 256  # characters of an OIP request id (it is echoed back)
MAX_PARAMETERS: Final = 64  # entries in any "parameters" object

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


def request_id(doc: dict[str, Any]) -> str | None:
    """An OIP request's ``id``, echoed in the answer: a string of at most MAX_ID characters."""
    raw = doc.get("id")
    if raw is None or (type(raw) is str and len(raw) <= MAX_ID):
        return raw
    raise BadRequest(f'"id" must be a string of at most {MAX_ID} characters, not {shown(raw)}')


def parameters_of(holder: dict[str, Any], what: str) -> dict[str, Any]:
    """``holder["parameters"]``: an object of at most MAX_PARAMETERS entries ({} when absent)."""
    params = holder.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{what}: parameters must be an object, not {shown(params)}")
    if len(params) > MAX_PARAMETERS:
        raise BadRequest(f"{what}: parameters has {len(params)} entries; at most {MAX_PARAMETERS}")
    return params


def _loads(body: bytes, what: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None


def _json_array(name: str, data: Any, dt: Datatype, kind: str = "input") -> np.ndarray:
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


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], kind: str = "input") -> None:
    expected = spec.shape
    if len(shape) != len(expected) or any(
        e != -1 and e != s for e, s in zip(expected, shape, strict=True)
    ):
        raise BadRequest(
            f"{kind} {spec.name!r}: shape {list(shape)} does not match the model's {list(expected)}"
        )


def _spec_for(
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


# -- the short form ----------------------------------------------------------------------------


def decode_short(
    body: bytes,
    content_type: bytes,
    specs: dict[str, TensorSpec],
    model: str,
    max_rows: int | None = None,
) -> Decoded:
    doc = short_document(body, content_type, ("inputs",))
    inputs = short_tensors(doc, "inputs", specs, model, max_rows)
    return Decoded(dict(inputs), rows_of(inputs, specs, model))


def short_document(body: bytes, content_type: bytes, keys: tuple[str, ...]) -> dict[str, Any]:
    check_json_content_type(content_type)
    doc = _loads(body, "request body")
    if not isinstance(doc, dict) or any(key not in doc for key in keys):
        wanted = " and ".join(f'"{key}"' for key in keys)
        raise BadRequest(f"request body must be a JSON object with {wanted}")
    return doc


def short_tensors(
    doc: dict[str, Any],
    key: str,
    specs: dict[str, TensorSpec],
    model: str,
    max_rows: int | None = None,
) -> dict[str, np.ndarray]:
    """``doc[key]`` in the short form: nested lists for a model's one tensor, or an object of
    them by name. ``max_rows``: the most rows a tensor may have (the model's max_batch), refused
    at the list's length, before its numbers are converted."""
    kind = key.removesuffix("s")
    raw = doc[key]
    if isinstance(raw, dict):
        items = list(raw.items())
    elif len(specs) == 1:
        items = [(next(iter(specs)), raw)]
    else:
        raise BadRequest(f'model {model!r} has several {key}: send "{key}" as an object by name')
    arrays: dict[str, np.ndarray] = {}
    for name, data in items:
        spec = _spec_for(specs, name, model, kind)
        check_rows(spec, data, kind, max_rows)
        array = _json_array(spec.name, data, spec.dtype, kind)
        _check_shape(spec, array.shape, kind)
        arrays[spec.name] = array
    return arrays


def check_rows(spec: TensorSpec, data: Any, kind: str, max_rows: int | None) -> None:
    """Refuse a short-form list of more rows than ``max_rows`` before converting it: the
    conversion of a body's worth of rows holds the event loop for a second."""
    if max_rows is not None and type(data) is list and len(data) > max_rows:
        raise BadRequest(
            f"{kind} {spec.name!r}: {len(data)} rows; the model takes at most {max_rows} per "
            "request (max_batch)"
        )


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


class ShortForm:
    """The short form for one model: the hot path of ``/models/{m}/predict``. The common case
    (one float input of fixed-width rows) costs one ``orjson.loads`` and a length check per row:
    the rows stay a list and the batch turns all requests' rows into one array (``rows_array``).
    Other shapes cost one ``np.asarray``; anything unusual goes through :func:`decode_short`."""

    def __init__(
        self,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        model: str,
        max_rows: int | None = None,
    ) -> None:
        self.model = model
        self.max_rows = max_rows  # the model's max_batch: more rows are refused unconverted
        self.specs = {t.name: t for t in inputs}
        self.outputs = outputs
        self._only = TensorCheck(inputs[0]) if len(inputs) == 1 else None
        self._plain_output = _plain(outputs)

    def decode(self, body: bytes, content_type: bytes) -> tuple[dict[str, InputData], int]:
        only = self._only
        if only is not None and content_type in JSON_TYPES:
            doc = loads_or_none(body)
            data = doc.get("inputs") if type(doc) is dict else None
            width = only.width
            if width is not None and type(data) is list and data:
                # Rows of the right width stay a list; their numbers are checked by the batch.
                for row in data:
                    if type(row) is not list or len(row) != width:
                        break
                else:
                    return {only.name: data}, len(data)
            check_rows(self.specs[only.name], data, "input", self.max_rows)
            array = only.array(data)
            if array is not None and only.shape_ok(array.shape):
                return {only.name: array}, array.shape[0]
        decoded = decode_short(body, content_type, self.specs, self.model, self.max_rows)
        return decoded.inputs, decoded.rows

    def encode(self, outputs: dict[str, np.ndarray]) -> Response:
        if self._plain_output:
            data = orjson.dumps(outputs[self.outputs[0].name], option=_NUMPY_OPTS)
            return Response(200, b'{"outputs":%s}' % data, JSON)
        return encode_short(outputs, self.outputs)

    def encode_batch(
        self, outputs: dict[str, np.ndarray], counts: list[int]
    ) -> list[Response] | None:
        """The responses of a whole batch whose requests hold ``counts`` rows each, in order, from
        one ``orjson.dumps`` of the batch's output: a request's response is its rows' slice of
        that JSON text. Serialising each request's slice of the array on its own costs about
        five times as much (a numpy view and an orjson call per request); the bytes are the
        same. None where the shortcut does not apply (several outputs, more than two dimensions,
        an array orjson cannot take): the caller then encodes request by request."""
        if not self._plain_output:
            return None
        array = outputs[self.outputs[0].name]
        if array.ndim == 2:
            # "[[r0],[r1],...]": orjson writes no whitespace, and a number holds no bracket.
            opening, separator, closing = b'{"outputs":[[', b"],[", b"]]}"
            strip = 2
        elif array.ndim == 1:
            opening, separator, closing = b'{"outputs":[', b",", b"]}"
            strip = 1
        else:
            return None
        try:
            text = orjson.dumps(array, option=_NUMPY_OPTS)
        except orjson.JSONEncodeError:
            return None
        rows = text[strip:-strip].split(separator)
        if len(rows) != len(array) or len(array) == 0:
            return None
        responses: list[Response] = []
        start = 0
        for count in counts:
            end = start + count
            part = rows[start] if count == 1 else separator.join(rows[start:end])
            responses.append(Response(200, opening + part + closing, JSON))
            start = end
        return responses


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
    array = _json_array(spec.name, data, spec.dtype, kind)
    _check_shape(spec, array.shape, kind)
    return array


def _plain(outputs: list[TensorSpec]) -> bool:
    """One output that orjson serialises straight from numpy."""
    return len(outputs) == 1 and outputs[0].datatype not in ("BF16", "BYTES", "FP16")


def loads_or_none(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def encode_short(outputs: dict[str, np.ndarray], specs: list[TensorSpec]) -> Response:
    if len(specs) == 1:
        doc: Any = {"outputs": _json_ready(outputs[specs[0].name], specs[0].dtype)}
    else:
        doc = {"outputs": {t.name: _json_ready(outputs[t.name], t.dtype) for t in specs}}
    return Response(200, orjson.dumps(doc, option=_NUMPY_OPTS), JSON)


def _json_ready(array: np.ndarray, dt: Datatype) -> Any:
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


# -- Open Inference Protocol -------------------------------------------------------------------


def oip_document(
    body: bytes, content_type: bytes, header_length: bytes | None
) -> tuple[dict[str, Any], int]:
    """The JSON part of an OIP request body and where its binary tensor data starts."""
    if header_length is not None:
        try:
            json_len = int(header_length)
        except ValueError:
            raise BadRequest("Inference-Header-Content-Length is not an integer") from None
        if not 0 <= json_len <= len(body):
            raise BadRequest("Inference-Header-Content-Length exceeds the body")
        doc = _loads(body[:json_len], "inference header")
    else:
        if content_type == OCTET:
            raise BadRequest("binary body without Inference-Header-Content-Length")
        check_json_content_type(content_type)
        json_len = len(body)
        doc = _loads(body, "request body")
    if not isinstance(doc, dict):
        raise BadRequest("inference request must be a JSON object")
    return doc, json_len


def oip_tensors(
    doc: dict[str, Any],
    key: str,
    specs: dict[str, TensorSpec],
    model: str,
    body: bytes,
    offset: int,
    binary: bool,
    max_rows: int | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Decode the tensor list ``doc[key]`` ("inputs", or "targets" for training) against
    ``specs``; binary data is read from ``body`` at ``offset``, in order. Returns the arrays and
    the offset after the binary data they claimed. ``max_rows``: the most rows a tensor may
    have (the model's max_batch), refused from the shape before any data is decoded."""
    kind = key.removesuffix("s")
    raw = doc.get(key)
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f'request needs a non-empty "{key}" list')
    if len(raw) > len(specs):  # each may be named once: more is refused before any is decoded
        raise BadRequest(
            f'"{key}" lists {len(raw)} tensors; model {model!r} has {len(specs)} {kind}(s)'
        )
    view = memoryview(body)
    arrays: dict[str, np.ndarray] = {}
    for entry in raw:
        if not isinstance(entry, dict):
            raise BadRequest(f"each {kind} must be an object with name, shape, datatype, data")
        spec = _spec_for(specs, entry.get("name"), model, kind)
        name = spec.name
        if name in arrays:
            raise BadRequest(f"{kind} {name!r} given twice")
        datatype = entry.get("datatype")
        if datatype != spec.datatype:
            known = (
                datatype if isinstance(datatype, str) and datatype in DATATYPES else shown(datatype)
            )
            raise BadRequest(
                f"{kind} {name!r}: datatype {known} does not match the model's {spec.datatype}"
            )
        shape = _shape_of(entry, spec, kind, max_rows)
        params = parameters_of(entry, f"{kind} {name!r}")
        size = params.get("binary_data_size")
        if size is not None:
            if not binary:
                raise BadRequest(
                    f"{kind} {name!r} has binary_data_size but the request has no "
                    "Inference-Header-Content-Length"
                )
            if type(size) is not int or size < 0:
                raise BadRequest(
                    f"{kind} {name!r}: binary_data_size must be a non-negative integer, "
                    f"not {shown(size)}"
                )
            if offset + size > len(body):
                raise BadRequest(f"{kind} {name!r}: binary_data_size exceeds the body")
            array = _binary_array(name, view[offset : offset + size], spec.dtype, shape, kind)
            offset += size
        else:
            if "data" not in entry:
                raise BadRequest(f"{kind} {name!r} has neither data nor binary_data_size")
            data = entry["data"]
            count = prod(shape)
            # Flat data (the protocol's form) is counted before it is converted.
            if type(data) is list and data and type(data[0]) is not list and len(data) != count:
                raise BadRequest(f"{kind} {name!r}: {len(data)} elements do not fill shape {shape}")
            array = _json_array(name, data, spec.dtype, kind)
            if array.size != count:
                raise BadRequest(
                    f"{kind} {name!r}: {array.size} elements do not fill shape {shape}"
                )
            array = array.reshape(shape)
        arrays[name] = array
    return arrays, offset


def _shape_of(
    entry: dict[str, Any], spec: TensorSpec, kind: str, max_rows: int | None
) -> list[int]:
    """A tensor entry's ``shape``, checked against the spec: its rank before its dimensions, so a
    shape of millions of dimensions is refused at its length."""
    shape = entry.get("shape")
    if not isinstance(shape, list):
        raise BadRequest(f"{kind} {spec.name!r}: shape must be a list of non-negative integers")
    if len(shape) != len(spec.shape):
        plain = len(shape) <= 32 and all(type(d) is int for d in shape)
        raise BadRequest(
            f"{kind} {spec.name!r}: shape {list(shape) if plain else f'of {len(shape)} entries'} "
            f"does not match the model's {list(spec.shape)}"
        )
    if not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest(f"{kind} {spec.name!r}: shape must be a list of non-negative integers")
    _check_shape(spec, tuple(shape), kind)
    if max_rows is not None and shape and shape[0] > max_rows:
        raise BadRequest(
            f"{kind} {spec.name!r}: shape {shape} has {shape[0]} rows; the model takes at most "
            f"{max_rows} per request (max_batch)"
        )
    return shape


def decode_oip(
    body: bytes,
    content_type: bytes,
    header_length: bytes | None,
    specs: dict[str, TensorSpec],
    model: str,
    outputs: list[TensorSpec] | None = None,
    max_rows: int | None = None,
) -> Decoded:
    """``outputs``: the model's, which bound and check the requested outputs here, before the
    inputs are decoded (without them, :func:`validate_requested` checks the names later)."""
    doc, offset = oip_document(body, content_type, header_length)
    req_id = request_id(doc)
    parameters = parameters_of(doc, "request")
    binary_default = parameters.get("binary_data_output") is True
    requested, binary = _requested_outputs(doc.get("outputs"), binary_default, outputs, model)
    inputs, offset = oip_tensors(
        doc, "inputs", specs, model, body, offset, header_length is not None, max_rows
    )
    if offset != len(body):
        raise BadRequest(f"{len(body) - offset} bytes of binary data are not claimed by any input")
    decoded = Decoded(dict(inputs), rows_of(inputs, specs, model), req_id)
    decoded.binary_default = binary_default
    if requested is not None:
        decoded.requested = requested
        decoded.binary = binary
    return decoded


def _requested_outputs(
    raw: Any, binary_default: bool, outputs: list[TensorSpec] | None, model: str
) -> tuple[list[str] | None, set[str]]:
    """The requested output names (None: all) and which go back binary. Each name once, and no
    more of them than the model has: the answer's size must not be the client's to multiply."""
    binary: set[str] = set()
    if raw is None:
        return None, binary
    if not isinstance(raw, list):
        raise BadRequest('"outputs" must be a list of {"name": ...} objects')
    known = None if outputs is None else {t.name for t in outputs}
    if known is not None and len(raw) > len(known):
        raise BadRequest(f'"outputs" requests {len(raw)} outputs; model {model!r} has {len(known)}')
    names: list[str] = []
    seen: set[str] = set()
    for entry in raw:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise BadRequest('each requested output needs a "name"')
        if known is not None and name not in known:
            raise BadRequest(
                f"unknown output {shown(name)} for model {model!r}; "
                f"known: {', '.join(sorted(known))}"
            )
        if name in seen:
            raise BadRequest(f"output {shown(name)} is requested twice")
        seen.add(name)
        names.append(name)
        flag = parameters_of(entry, f"output {shown(name)}").get("binary_data")
        if flag is True or (flag is None and binary_default):
            binary.add(name)
    return names, binary


def _binary_array(
    name: str, data: memoryview, dt: Datatype, shape: list[int], kind: str = "input"
) -> np.ndarray:
    count = prod(shape)
    if dt.name == "BYTES":
        # Each element takes 4 bytes of length at least: a count the data cannot hold is
        # refused before splitting, and the split stops at the count.
        if count * 4 > len(data):
            raise BadRequest(
                f"{kind} {name!r}: binary_data_size {len(data)} cannot hold the {count} BYTES "
                f"elements of shape {shape}"
            )
        items = _split_bytes(name, data, count, kind)
        if len(items) != count:
            raise BadRequest(f"{kind} {name!r}: {len(items)} BYTES elements do not fill {shape}")
        out = np.empty(count, dtype=object)
        out[:] = items
        return out.reshape(shape)
    if len(data) != count * dt.itemsize:
        raise BadRequest(
            f"{kind} {name!r}: binary_data_size {len(data)} != {count} x {dt.itemsize} bytes "
            f"for {dt.name} {shape}"
        )
    # Binary tensor data is little-endian by the protocol.
    return np.frombuffer(data, dtype=dt.numpy.newbyteorder("<"), count=count).reshape(shape)


def _split_bytes(name: str, data: memoryview, count: int, kind: str = "input") -> list[bytes]:
    """The length-prefixed elements of ``data``, ``count`` at most (more: BadRequest)."""
    items: list[bytes] = []
    pos = 0
    end = len(data)
    while pos < end:
        if len(items) == count:
            raise BadRequest(f"{kind} {name!r}: more BYTES elements than its shape holds ({count})")
        if pos + 4 > end:
            raise BadRequest(f"{kind} {name!r}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + length > end:
            raise BadRequest(f"{kind} {name!r}: truncated BYTES element")
        items.append(bytes(data[pos : pos + length]))
        pos += length
    return items


def _bytes_payload(array: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for value in array.ravel():
        raw = value if isinstance(value, bytes) else str(value).encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def encode_oip(
    model: str,
    version: str,
    decoded: Decoded,
    outputs: dict[str, np.ndarray],
    specs: list[TensorSpec],
) -> Response:
    by_name = {t.name: t for t in specs}
    names = decoded.requested if decoded.requested is not None else list(by_name)
    doc_outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in names:
        spec = by_name.get(name)
        if spec is None:
            raise BadRequest(f"unknown output {name!r} for model {model!r}")
        array = outputs[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": spec.datatype,
            "shape": list(array.shape),
        }
        if name in decoded.binary or (decoded.requested is None and decoded.binary_default):
            blob = (
                _bytes_payload(array)
                if spec.datatype == "BYTES"
                else np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            data = _json_ready(array, spec.dtype)
            entry["data"] = data.ravel() if isinstance(data, np.ndarray) else data
        doc_outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": doc_outputs}
    if decoded.id is not None:
        doc["id"] = decoded.id
    header = orjson.dumps(doc, option=_NUMPY_OPTS)
    if not blobs:
        return Response(200, header, JSON)
    return Response(
        200,
        b"".join([header, *blobs]),
        OCTET,
        [(b"inference-header-content-length", b"%d" % len(header))],
    )


class OIPForm:
    """The Open Inference Protocol for one model, with a fast path for plain JSON requests
    (``{"inputs": [{"name", "shape", "datatype", "data"}]}``, all outputs as JSON). Requests
    using the binary extension, requested outputs or parameters take :func:`decode_oip`."""

    _FAST_KEYS: Final = frozenset({"id", "inputs"})

    def __init__(
        self,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        model: str,
        version: str,
        max_rows: int | None = None,
    ) -> None:
        self.model = model
        self.version = version
        self.max_rows = max_rows  # the model's max_batch: larger shapes are refused undecoded
        self.specs = {t.name: t for t in inputs}
        self.outputs = outputs
        self._checks = {t.name: TensorCheck(t) for t in inputs}
        self._plain_output = _plain(outputs)
        first = outputs[0]
        prefix = {"model_name": model, "model_version": version}
        entry = {"name": first.name, "datatype": first.datatype}
        # '{"model_name":..,"model_version":..,"outputs":[{"name":..,"datatype":..,"shape":'
        self._head = orjson.dumps(prefix)[:-1] + b',"outputs":[' + orjson.dumps(entry)[:-1]
        self._head += b',"shape":'
        self._data_key = b',"data":'

    def decode(self, body: bytes, content_type: bytes, header_length: bytes | None) -> Decoded:
        if header_length is None and content_type in JSON_TYPES:
            fast = self._decode_fast(loads_or_none(body))
            if fast is not None:
                return fast
        return decode_oip(
            body,
            content_type,
            header_length,
            self.specs,
            self.model,
            self.outputs,
            self.max_rows,
        )

    def _decode_fast(self, doc: Any) -> Decoded | None:
        if type(doc) is not dict or not self._FAST_KEYS.issuperset(doc):
            return None
        raw = doc.get("inputs")
        checks = self._checks
        if type(raw) is not list or len(raw) != len(checks):
            return None
        inputs: dict[str, InputData] = {}
        rows = -1
        for entry in raw:
            if type(entry) is not dict or "parameters" in entry:
                return None
            name = entry.get("name")
            check = checks.get(name) if type(name) is str else None  # a list is unhashable
            shape = entry.get("shape")
            if check is None or check.name in inputs or entry.get("datatype") != check.datatype:
                return None
            data = entry.get("data")
            width = check.width
            if (
                width is not None
                and type(shape) is list
                and len(shape) == 2
                and shape[1] == width
                and type(shape[0]) is int
                and shape[0] > 0
                and type(data) is list
                and len(data) == shape[0] * width
                and type(data[0]) is not list  # nested data is valid OIP too: the array path
                and (rows == -1 or shape[0] == rows)
            ):
                # Flat row-major floats as JSON rows; the batch checks the numbers (rows_array).
                rows = shape[0]
                inputs[check.name] = (
                    [data]
                    if rows == 1
                    else [data[i : i + width] for i in range(0, len(data), width)]
                )
                continue
            if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
                return None
            array = check.array(data)
            if array is None or array.size != prod(shape):
                return None
            shaped: np.ndarray = array.reshape(shape)
            if not check.shape_ok(shaped.shape) or (rows != -1 and shaped.shape[0] != rows):
                return None
            rows = shaped.shape[0]
            inputs[check.name] = shaped
        return Decoded(inputs, rows, request_id(doc))

    def encode(self, decoded: Decoded, outputs: dict[str, np.ndarray]) -> Response:
        if self._plain_output and decoded.requested is None and not decoded.binary_default:
            # The same document encode_oip builds, from a template serialised once: only the
            # shape, the data and the id change per request.
            array = outputs[self.outputs[0].name]
            shape = orjson.dumps(array.shape)
            data = orjson.dumps(array.ravel(), option=_NUMPY_OPTS)
            if decoded.id is None:
                body = b"%s%s%s%s}]}" % (self._head, shape, self._data_key, data)
            else:
                req_id = orjson.dumps(decoded.id)
                body = b'%s%s%s%s}],"id":%s}' % (self._head, shape, self._data_key, data, req_id)
            return Response(200, body, JSON)
        return encode_oip(self.model, self.version, decoded, outputs, self.outputs)


def validate_requested(decoded: Decoded, specs: list[TensorSpec], model: str) -> None:
    """Reject unknown requested outputs before the request costs a forward pass."""
    if decoded.requested is None:
        return
    known = {t.name for t in specs}
    for name in decoded.requested:
        if name not in known:
            raise BadRequest(
                f"unknown output {name!r} for model {model!r}; known: {', '.join(sorted(known))}"
            )
