"""The Open Inference Protocol (KServe v2) request and response documents: the JSON object with
``"inputs"`` (and, for training, ``"targets"``), an ``id`` and ``parameters``, and requested
outputs. A tensor's data is JSON (``"data"``) or, with the binary tensor data extension, bytes
after the JSON document (``"binary_data_size"``; :mod:`.oip_binary` reads and writes those).
:class:`OIPForm` is the hot path of ``/v2/models/{m}/infer`` for plain JSON requests.
"""

from __future__ import annotations

from math import prod
from typing import Any, Final

import numpy as np
import orjson

from webtorch.errors import BadRequest
from webtorch.http.messages import JSON, Response
from webtorch.serve.datatypes import DATATYPES
from webtorch.serve.model import TensorSpec
from webtorch.serve.wire.oip_binary import (
    OCTET,
    binary_array,
    binary_response,
    json_length,
    output_blob,
)
from webtorch.serve.wire.tensors import (
    JSON_TYPES,
    NUMPY_OPTS,
    Decoded,
    InputData,
    TensorCheck,
    check_json_content_type,
    check_shape,
    json_array,
    json_ready,
    loads_or_none,
    parse_json,
    plain_output,
    rows_of,
    shown,
    spec_for,
)

# Bounds on what one request may ask for, checked before the work they would cost (a request
# naming one output a million times, or a million BYTES elements for a shape of four, is refused
# at the count, not after the work).
MAX_ID: Final = 256  # characters of an OIP request id (it is echoed back)
MAX_PARAMETERS: Final = 64  # entries in any "parameters" object


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


def oip_document(
    body: bytes, content_type: bytes, header_length: bytes | None
) -> tuple[dict[str, Any], int]:
    """The JSON part of an OIP request body and where its binary tensor data starts."""
    if header_length is not None:
        json_len = json_length(header_length, body)
        doc = parse_json(body[:json_len], "inference header")
    else:
        if content_type == OCTET:
            raise BadRequest("binary body without Inference-Header-Content-Length")
        check_json_content_type(content_type)
        json_len = len(body)
        doc = parse_json(body, "request body")
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
        spec = spec_for(specs, entry.get("name"), model, kind)
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
            array = binary_array(name, view[offset : offset + size], spec.dtype, shape, kind)
            offset += size
        else:
            if "data" not in entry:
                raise BadRequest(f"{kind} {name!r} has neither data nor binary_data_size")
            data = entry["data"]
            count = prod(shape)
            # Flat data (the protocol's form) is counted before it is converted.
            if type(data) is list and data and type(data[0]) is not list and len(data) != count:
                raise BadRequest(f"{kind} {name!r}: {len(data)} elements do not fill shape {shape}")
            array = json_array(name, data, spec.dtype, kind)
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
    check_shape(spec, tuple(shape), kind)
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
            blob = output_blob(array, spec.datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            data = json_ready(array, spec.dtype)
            entry["data"] = data.ravel() if isinstance(data, np.ndarray) else data
        doc_outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": doc_outputs}
    if decoded.id is not None:
        doc["id"] = decoded.id
    header = orjson.dumps(doc, option=NUMPY_OPTS)
    if not blobs:
        return Response(200, header, JSON)
    return binary_response(header, blobs)


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
        self._plain_output = plain_output(outputs)
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
            data = orjson.dumps(array.ravel(), option=NUMPY_OPTS)
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
