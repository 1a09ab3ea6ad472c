"""The wire forms of a train request: inputs and targets in, the request's loss and step out.

- Short form: ``POST /models/{m}/train`` with ``{"inputs": [[0, 1]], "targets": [[1]]}``
  (a model with several inputs or targets sends objects keyed by tensor name) answered
  ``{"loss": 0.69, "step": 12}``.
- Open Inference Protocol extension: ``POST /v2/models/{m}/train`` with the same tensor objects as
  ``infer`` under ``"inputs"`` and ``"targets"``; binary tensor data (``Inference-Header-Content-
  Length``) is read inputs first, then targets, each in the order listed. Answered
  ``{"model_name", "model_version", "id"?, "loss", "step"}``.

Decoding reuses the inference codecs' validation, so a bad target is named like a bad input.
Train requests always become arrays here (no lazy JSON rows): the WAL stores the batch as arrays
anyway, and a malformed example must be refused before it can reach the log.
"""

from __future__ import annotations

from typing import Any, Final, TypeGuard

import numpy as np
import orjson

from webtorch.errors import BadRequest
from webtorch.http.messages import JSON, Response
from webtorch.serve.model import LoadedModel, TensorSpec
from webtorch.serve.wire.oip_json import oip_document, oip_tensors, request_id
from webtorch.serve.wire.short import check_rows, short_document, short_tensors
from webtorch.serve.wire.tensors import (
    JSON_TYPES,
    InputData,
    TensorCheck,
    loads_or_none,
    rows_of,
    strict_array,
)


class TrainRequest:
    """A decoded train request. The short form's fast path leaves fixed-width float rows as JSON
    lists, converted for the whole micro-batch at once; :func:`settle` checks one request's.
    (Not a dataclass, so that its ``__init__`` compiles: see
    :class:`webtorch.http.messages.Request`.)"""

    def __init__(
        self,
        inputs: dict[str, InputData],
        targets: dict[str, InputData],
        rows: int,
        id: str | None = None,
    ) -> None:
        self.inputs = inputs
        self.targets = targets
        self.rows = rows
        self.id = id
        self.key: str | None = None  # the Idempotency-Key header (see idempotency_key)


MAX_KEY_LENGTH: Final = 128


def idempotency_key(raw: bytes) -> str:
    """A train request's ``Idempotency-Key`` header, checked: 1 to 128 visible ASCII characters
    (a key is kept in memory, in checkpoints and in the WAL, so it is small and plain)."""
    if not 0 < len(raw) <= MAX_KEY_LENGTH:
        raise BadRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters, got {len(raw)}"
        )
    for byte in raw:
        if not 0x21 <= byte <= 0x7E:
            raise BadRequest("Idempotency-Key must be visible ASCII characters (no spaces)")
    return raw.decode("ascii")


class UncheckedRows(Exception):
    """Some request's JSON rows hold something other than numbers (:func:`settle` names it)."""


def settle(request: TrainRequest, inputs: list[TensorSpec], targets: list[TensorSpec]) -> None:
    """Replace a request's unchecked JSON rows by checked arrays; BadRequest names a bad one."""
    for group, specs, kind in (
        (request.inputs, inputs, "input"),
        (request.targets, targets, "target"),
    ):
        for spec in specs:
            data = group[spec.name]
            if type(data) is list:
                group[spec.name] = strict_array(spec, data, kind)


class TrainForms:
    """Decoders and encoders of one model's train requests."""

    def __init__(self, model: LoadedModel, max_rows: int | None = None) -> None:
        self.model = model.name
        # The model's train.max_batch: an OIP tensor whose shape claims more rows is refused
        # from its shape, a short-form list of more rows at its length, before any number is
        # converted (as inference refuses past max_batch).
        self.max_rows = max_rows
        self.version = model.spec.version
        self.inputs = {t.name: t for t in model.inputs}
        self.targets = {t.name: t for t in model.targets}
        for spec in (*model.inputs, *model.targets):
            if spec.dtype.torch is None:
                # BYTES cannot go into a WAL record or a gradient; preprocess would have to turn
                # them into tensors first, which training does not do yet.
                raise ValueError(f"tensor {spec.name!r}: BYTES tensors cannot be trained on")
        # The common case, one input and one target, decodes through the inference fast path's
        # checks; anything unusual goes to the general decoders, which word the errors.
        self._fast = (
            (TensorCheck(model.inputs[0]), TensorCheck(model.targets[0]))
            if len(model.inputs) == 1 and len(model.targets) == 1
            else None
        )
        prefix = orjson.dumps({"model_name": self.model, "model_version": self.version})
        self._oip_head = prefix[:-1]  # '{"model_name":..,"model_version":..'

    def _request(
        self, inputs: dict[str, np.ndarray], targets: dict[str, np.ndarray], id: str | None
    ) -> TrainRequest:
        rows = rows_of(inputs, self.inputs, self.model)
        target_rows = rows_of(targets, self.targets, self.model, "target")
        if rows != target_rows:
            raise BadRequest(f"{rows} rows of inputs but {target_rows} rows of targets")
        return TrainRequest(_native(inputs), _native(targets), rows, id)

    def decode_short(self, body: bytes, content_type: bytes) -> TrainRequest:
        fast = self._fast
        if fast is not None and content_type in JSON_TYPES:
            doc = loads_or_none(body)
            if type(doc) is dict:
                check_x, check_y = fast
                rows_x = doc.get("inputs")
                rows_y = doc.get("targets")
                if (
                    check_x.width is not None
                    and check_y.width is not None
                    and _rows_of_width(rows_x, check_x.width)
                    and _rows_of_width(rows_y, check_y.width)
                    and len(rows_x) == len(rows_y)
                ):
                    # Their numbers are checked when the micro-batch converts them.
                    return TrainRequest({check_x.name: rows_x}, {check_y.name: rows_y}, len(rows_x))
                check_rows(self.inputs[check_x.name], rows_x, "input", self.max_rows)
                check_rows(self.targets[check_y.name], rows_y, "target", self.max_rows)
                x = check_x.array(rows_x)
                y = check_y.array(rows_y)
                if (
                    x is not None
                    and y is not None
                    and check_x.shape_ok(x.shape)
                    and check_y.shape_ok(y.shape)
                    and x.shape[0] == y.shape[0]
                ):
                    return TrainRequest({check_x.name: x}, {check_y.name: y}, x.shape[0])
        doc = short_document(body, content_type, ("inputs", "targets"))
        inputs = short_tensors(doc, "inputs", self.inputs, self.model, self.max_rows)
        targets = short_tensors(doc, "targets", self.targets, self.model, self.max_rows)
        return self._request(inputs, targets, None)

    def decode_oip(
        self, body: bytes, content_type: bytes, header_length: bytes | None
    ) -> TrainRequest:
        doc, offset = oip_document(body, content_type, header_length)
        req_id = request_id(doc)  # refused before any tensor is decoded
        binary = header_length is not None
        inputs, offset = oip_tensors(
            doc, "inputs", self.inputs, self.model, body, offset, binary, self.max_rows
        )
        targets, offset = oip_tensors(
            doc, "targets", self.targets, self.model, body, offset, binary, self.max_rows
        )
        if offset != len(body):
            raise BadRequest(
                f"{len(body) - offset} bytes of binary data are not claimed by any tensor"
            )
        return self._request(inputs, targets, req_id)

    @staticmethod
    def encode_short(loss: float, step: int) -> Response:
        return Response(200, b'{"loss":%s,"step":%d}' % (orjson.dumps(loss), step), JSON)

    # The short form's encoders and the key check as the endpoint (serve/, which imports
    # nothing from train/ at runtime) reaches them: through the forms its pipeline made.

    @staticmethod
    def encode_short_request(request: TrainRequest, loss: float, step: int) -> Response:
        return TrainForms.encode_short(loss, step)

    @staticmethod
    def encode_short_batch(losses: list[float], step: int) -> list[Response]:
        return encode_short_batch(losses, step)

    @staticmethod
    def idempotency_key(raw: bytes) -> str:
        return idempotency_key(raw)

    def encode_oip(self, request: TrainRequest, loss: float, step: int) -> Response:
        tail = b',"loss":%s,"step":%d' % (orjson.dumps(loss), step)
        if request.id is not None:
            tail += b',"id":%s' % orjson.dumps(request.id)
        return Response(200, self._oip_head + tail + b"}", JSON)


def encode_short_batch(losses: list[float], step: int) -> list[Response]:
    """The short-form answers of a step's requests, the same bytes as
    :meth:`TrainForms.encode_short` gives each: one ``orjson.dumps`` of all the losses, cut at the
    commas (a JSON number has none), and the step's tail formatted once."""
    numbers = orjson.dumps(losses)[1:-1].split(b",")
    tail = b',"step":%d}' % step
    return [Response(200, b'{"loss":%s%s' % (number, tail), JSON) for number in numbers]


def _native(arrays: dict[str, np.ndarray]) -> dict[str, InputData]:
    """One contiguous array per tensor in the native byte order: what a batch concatenates and
    the WAL stores (binary tensor data arrives as little-endian views of the body)."""
    return {
        name: np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
        for name, array in arrays.items()
    }


def _rows_of_width(data: Any, width: int) -> TypeGuard[list[Any]]:
    if type(data) is not list or not data:
        return False
    for row in data:  # noqa: SIM110 - a loop: all() of a generator costs more per request
        if type(row) is not list or len(row) != width:
            return False
    return True
