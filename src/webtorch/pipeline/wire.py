"""A pipeline's requests and answers on the wire.

- Records as users have them (``POST /pipelines/{p}/predict``): JSON (``{"records": [...]}``
  or a JSON list), ``text/plain`` (one str record), ``multipart/form-data`` (each part one
  record: a file part's bytes, a field's text) or any other content type (the raw body, one
  bytes record). Answered ``{"outputs": [...]}``, one per record.
- The Open Inference Protocol (``POST /v2/pipelines/{p}/infer``): any named input tensors
  (JSON or binary tensor data), answered with the output rows as tensors.
- One stage's batch (``POST /v2/pipelines/{p}/stages/{s}/infer``, what a remote stage sends):
  binary tensor data. Columns go as tensors of their own datatype; records (and object columns)
  as a BYTES tensor beside a UINT8 ``<name>:kinds`` tensor saying how to read each element
  (bytes, UTF-8 text, JSON, or a ``Reject`` and its reason). A join's inputs are prefixed
  ``<stage>/``. :func:`encode_stage_batch` and :func:`decode_stage_batch` are both sides.

Nothing here unpickles: request bytes become JSON values, text, bytes and numpy arrays only.
"""

from __future__ import annotations

import email.parser
import email.policy
import struct
from typing import Any, Final

import numpy as np
import orjson

from webtorch.errors import BadRequest, PayloadTooLarge
from webtorch.http.messages import JSON, Response
from webtorch.pipeline.batch import Joined, dumps, to_form
from webtorch.pipeline.spec import Reject
from webtorch.serve.datatypes import DATATYPES
from webtorch.serve.model import TensorSpec
from webtorch.serve.wire.oip_binary import OCTET, binary_response, output_blob
from webtorch.serve.wire.oip_json import oip_document, oip_tensors, request_id
from webtorch.serve.wire.tensors import parse_json, shown

MULTIPART: Final = b"multipart/form-data"
TEXT: Final = b"text/plain"
MAX_TENSORS: Final = 64  # input tensors of one OIP request
MAX_RANK: Final = 32

# numpy dtype -> OIP datatype (BF16 travels as UINT16: numpy has no bfloat16).
_DATATYPE: Final = {
    dt.numpy: name for name, dt in DATATYPES.items() if name not in ("BF16", "BYTES")
}

# How a BYTES element of a records tensor is read back.
KIND_BYTES: Final = 0
KIND_TEXT: Final = 1
KIND_JSON: Final = 2
KIND_REJECT: Final = 3


class Limits:
    """What one request may bring: records, and bytes per record."""

    def __init__(self, max_records: int, max_record_bytes: int) -> None:
        self.max_records = max_records
        self.max_record_bytes = max_record_bytes

    def check(self, records: list[Any]) -> list[Any]:
        if not records:
            raise BadRequest("the request has no records")
        if len(records) > self.max_records:
            raise PayloadTooLarge(
                f"{len(records)} records; a request may carry at most {self.max_records} "
                "(max_records)"
            )
        limit = self.max_record_bytes
        for i, record in enumerate(records):
            if isinstance(record, str | bytes) and len(record) > limit:
                raise PayloadTooLarge(
                    f"record {i} has {len(record)} bytes; at most {limit} (max_record_bytes)"
                )
        return records


# -- records as users have them ---------------------------------------------------------------


def decode_records(
    body: bytes, content_type: bytes, raw_type: bytes | None, limits: Limits, train: bool = False
) -> tuple[list[Any], Any]:
    """A request body as records (and, for training, its ``targets``; None otherwise)."""
    targets: Any = None
    if content_type == JSON or content_type.endswith(b"+json"):
        doc = parse_json(body, "request body")
        if isinstance(doc, dict):
            records = doc.get("records")
            if not isinstance(records, list):
                raise BadRequest('the JSON body needs "records": a list, one entry per record')
            targets = doc.get("targets")
        elif isinstance(doc, list) and not train:
            records = doc
        else:
            raise BadRequest(
                'send {"records": [...]}'
                + (', "targets": [...]}' if train else " or a JSON list of records")
            )
    elif content_type == TEXT:
        try:
            records = [body.decode("utf-8")]
        except UnicodeDecodeError:
            raise BadRequest("a text/plain body must be UTF-8") from None
    elif content_type == MULTIPART:
        records, fields = _multipart(body, raw_type or b"", limits)
        if train:
            raw = fields.get("targets")
            targets = None if raw is None else parse_json(raw, "the targets field")
    else:
        records = [body]
    if train and targets is None:
        raise BadRequest('training needs "targets": one per record')
    return limits.check(records), targets


def _multipart(body: bytes, raw_type: bytes, limits: Limits) -> tuple[list[Any], dict[str, bytes]]:
    """Each file part a bytes record, each other field a text record (``targets`` aside)."""
    boundary = _boundary(raw_type)
    # Counted before parsing: the parser's work must not be the client's to multiply.
    parts = body.count(b"--" + boundary) - 1
    if parts > limits.max_records + 1:
        raise PayloadTooLarge(
            f"{parts} multipart parts; a request may carry at most {limits.max_records} records"
        )
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + raw_type + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise BadRequest("the multipart/form-data body has no parts")
    records: list[Any] = []
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        name = part.get_param("name", header="content-disposition")
        if part.get_filename() is not None:
            records.append(data)
        elif name == "targets":
            fields["targets"] = data
        else:
            try:
                records.append(data.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRequest(f"multipart field {shown(name)} is not UTF-8 text") from None
    return records, fields


def _boundary(raw_type: bytes) -> bytes:
    for param in raw_type.split(b";")[1:]:
        key, _, value = param.strip().partition(b"=")
        if key.strip().lower() == b"boundary":
            value = value.strip().strip(b'"')
            if 0 < len(value) <= 70:
                return value
    raise BadRequest("multipart/form-data needs a boundary parameter of 1 to 70 characters")


def encode_records(rows: list[Any]) -> Response:
    """``{"outputs": [...]}``, one per record."""
    try:
        return Response(200, b'{"outputs":%s}' % dumps(rows), JSON)
    except TypeError as exc:
        raise ValueError(f"the output rows cannot be answered as JSON: {exc}") from None


# -- the Open Inference Protocol ---------------------------------------------------------------


def decode_oip_inputs(
    body: bytes, content_type: bytes, header_length: bytes | None, what: str, max_rows: int
) -> tuple[dict[str, np.ndarray], int, str | None]:
    """An OIP request's input tensors, whatever their names (a pipeline declares none): the
    arrays, their rows and the request's id."""
    doc, offset = oip_document(body, content_type, header_length)
    req_id = request_id(doc)
    binary = header_length is not None
    arrays, rows, offset = oip_arrays(doc, "inputs", body, offset, binary, what, max_rows)
    claimed(body, offset)
    return arrays, rows, req_id


def claimed(body: bytes, offset: int) -> None:
    """Every byte of binary data belongs to some tensor."""
    if offset != len(body):
        raise BadRequest(f"{len(body) - offset} bytes of binary data are not claimed by any tensor")


def oip_arrays(
    doc: dict[str, Any],
    key: str,
    body: bytes,
    offset: int,
    binary: bool,
    what: str,
    max_rows: int,
) -> tuple[dict[str, np.ndarray], int, int]:
    """The tensors listed under ``doc[key]``, each checked as the models' are (shape, data,
    binary sizes), with no declared specs: each tensor's own entry says what it is. Returns
    them, their rows and where their binary data ended."""
    raw = doc.get(key)
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f'request needs a non-empty "{key}" list')
    if len(raw) > MAX_TENSORS:
        raise BadRequest(f'"{key}" lists {len(raw)} tensors; at most {MAX_TENSORS}')
    specs: dict[str, TensorSpec] = {}
    for entry in raw:
        if not isinstance(entry, dict):
            raise BadRequest("each tensor must be an object with name, shape, datatype, data")
        name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
        if not isinstance(name, str) or not name or len(name) > 256:
            raise BadRequest(f"tensor name {shown(name)}: a string of 1 to 256 characters")
        if datatype not in DATATYPES:
            raise BadRequest(f"tensor {name!r}: unknown datatype {shown(datatype)}")
        if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK:
            raise BadRequest(f"tensor {name!r}: shape must be a list of 1 to {MAX_RANK} sizes")
        specs[name] = TensorSpec(name, datatype, tuple(-1 for _ in shape))
    arrays, offset = oip_tensors(doc, key, specs, what, body, offset, binary, max_rows)
    sizes = {len(a) for a in arrays.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise BadRequest("all tensors must have the same, non-zero number of rows")
    return arrays, sizes.pop(), offset


def oip_value(arrays: dict[str, np.ndarray], takes: str) -> Any:
    """The request's rows for a first stage: columns for one that takes tensors; for one that
    takes records, one input's elements (BYTES: raw bytes), or several inputs as dicts."""
    if takes == "tensors":
        return dict(arrays)
    if len(arrays) == 1:
        return list(next(iter(arrays.values())))
    return to_form(dict(arrays), "records")


def encode_oip(
    result: Any, name: str, req_id: str | None, binary: bool, kind: str = "pipeline_name"
) -> Response:
    """The output rows as OIP output tensors (records: one ``data`` column, dicts by key)."""
    columns = to_form(result, "tensors")
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for column_name, column in columns.items():
        array = _numpy(column)
        datatype = _DATATYPE.get(array.dtype)
        if datatype is None:
            array, datatype = _bytes_elements(array), "BYTES"
        entry: dict[str, Any] = {
            "name": column_name,
            "datatype": datatype,
            "shape": list(array.shape),
        }
        if binary:
            blob = output_blob(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [_text(v) for v in array.ravel()]
        else:
            entry["data"] = array.ravel()
        outputs.append(entry)
    doc: dict[str, Any] = {kind: name, "outputs": outputs}
    if req_id is not None:
        doc["id"] = req_id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return binary_response(header, blobs) if binary else Response(200, header, JSON)


def _numpy(column: Any) -> np.ndarray:
    if hasattr(column, "detach"):
        column = column.detach().cpu().numpy()
    if isinstance(column, np.ndarray):
        return column
    array = np.empty(len(column), dtype=object)
    array[:] = list(column)
    return array if array.dtype == object and _mixed(array) else np.asarray(list(column))


def _mixed(array: np.ndarray) -> bool:
    return any(isinstance(v, str | bytes | dict | list | np.ndarray) for v in array.ravel())


def _bytes_elements(array: np.ndarray) -> np.ndarray:
    out = np.empty(array.shape, dtype=object)
    flat = out.reshape(-1)
    for i, value in enumerate(array.ravel()):
        flat[i] = value if isinstance(value, bytes) else _text(value).encode()
    return out


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return dumps(value).decode()


# -- one stage's batch -------------------------------------------------------------------------


def encode_stage_batch(batch: Any, key: str = "inputs") -> tuple[bytes, int]:
    """A batch as an OIP binary body and its Inference-Header-Content-Length: a remote
    placement sends it (``inputs``), a stage's endpoint answers the result (``outputs``)."""
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    if isinstance(batch, Joined):
        form = {name: _add_batch(part, f"{name}/", tensors, blobs) for name, part in batch.items()}
        params: dict[str, Any] = {"joined": form}
    else:
        params = {"form": _add_batch(batch, "", tensors, blobs)}
    header = orjson.dumps({key: tensors, "parameters": params})
    return b"".join([header, *blobs]), len(header)


def stage_response(batch: Any) -> Response:
    """A stage's result, answered in the stage wire form."""
    body, length = encode_stage_batch(batch, "outputs")
    return Response(200, body, OCTET, [(b"inference-header-content-length", b"%d" % length)])


def _add_batch(batch: Any, prefix: str, tensors: list[dict[str, Any]], blobs: list[bytes]) -> str:
    if isinstance(batch, list):
        _add_values(prefix + "records", batch, tensors, blobs)
        return "records"
    for name, column in batch.items():
        array = _numpy(column) if not isinstance(column, list) else None
        datatype = None if array is None else _DATATYPE.get(array.dtype)
        if array is None or datatype is None:
            _add_values(prefix + name, list(column), tensors, blobs)
        else:
            blob = output_blob(array, datatype)
            tensors.append(
                {
                    "name": prefix + name,
                    "datatype": datatype,
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(blob)},
                }
            )
            blobs.append(blob)
    return "columns"


def _add_values(
    name: str, values: list[Any], tensors: list[dict[str, Any]], blobs: list[bytes]
) -> None:
    kinds = bytearray(len(values))
    parts: list[bytes] = []
    for i, value in enumerate(values):
        if isinstance(value, bytes):
            raw, kind = value, KIND_BYTES
        elif isinstance(value, str):
            raw, kind = value.encode("utf-8", "surrogatepass"), KIND_TEXT
        elif type(value) is Reject:
            raw, kind = value.reason.encode(), KIND_REJECT
        else:
            raw, kind = dumps(value), KIND_JSON
        kinds[i] = kind
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    blob = b"".join(parts)
    tensors.append(
        {
            "name": name,
            "datatype": "BYTES",
            "shape": [len(values)],
            "parameters": {"binary_data_size": len(blob)},
        }
    )
    tensors.append(
        {
            "name": name + ":kinds",
            "datatype": "UINT8",
            "shape": [len(values)],
            "parameters": {"binary_data_size": len(kinds)},
        }
    )
    blobs.append(blob)
    blobs.append(bytes(kinds))


def decode_stage_batch(
    body: bytes, header_length: bytes | None, max_rows: int, key: str = "inputs"
) -> tuple[Any, int]:
    """A stage wire body (``key``: "inputs" in a request, "outputs" in an answer) as the batch
    it encodes, and its rows."""
    if header_length is None:
        raise BadRequest("a stage batch is binary: it needs Inference-Header-Content-Length")
    doc, offset = oip_document(body, OCTET, header_length)
    arrays, rows, offset = oip_arrays(doc, key, body, offset, True, "stage", max_rows)
    claimed(body, offset)
    params = doc.get("parameters")
    if not isinstance(params, dict):
        raise BadRequest('a stage batch needs "parameters" with its "form"')
    joined = params.get("joined")
    if isinstance(joined, dict):
        return Joined({str(n): _batch(arrays, f"{n}/", form) for n, form in joined.items()}), rows
    return _batch(arrays, "", params.get("form")), rows


def _batch(arrays: dict[str, np.ndarray], prefix: str, form: Any) -> Any:
    mine = {n[len(prefix) :]: a for n, a in arrays.items() if n.startswith(prefix)}
    if form == "records":
        return _values(mine, "records")
    if form != "columns":
        raise BadRequest(f"unknown stage batch form {shown(form)}")
    columns: dict[str, Any] = {}
    for name, array in mine.items():
        if name.endswith(":kinds"):
            continue
        columns[name] = _values(mine, name) if name + ":kinds" in mine else array
    return columns


def _values(arrays: dict[str, np.ndarray], name: str) -> list[Any]:
    data, kinds = arrays.get(name), arrays.get(name + ":kinds")
    if data is None or kinds is None or data.shape != kinds.shape or data.dtype != object:
        raise BadRequest(f"stage batch: {name!r} needs BYTES elements and {name}:kinds")
    values: list[Any] = []
    for raw, kind in zip(data.tolist(), kinds.tolist(), strict=True):
        if kind == KIND_BYTES:
            values.append(raw)
        elif kind == KIND_TEXT:
            values.append(raw.decode("utf-8", "surrogatepass"))
        elif kind == KIND_JSON:
            values.append(parse_json(raw, f"a {name!r} element"))
        elif kind == KIND_REJECT:
            values.append(Reject(raw.decode("utf-8", "replace")))
        else:
            raise BadRequest(f"stage batch: unknown element kind {kind} in {name!r}")
    return values
