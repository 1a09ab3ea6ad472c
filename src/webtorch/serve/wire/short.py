"""The short form, for humans: ``{"inputs": [[0, 1]]}`` -> ``{"outputs": [[...]]}`` (a dict keyed by
tensor name when a model has several). :class:`ShortForm` is the hot path of
``/models/{m}/predict``; :func:`decode_short` the general decoder that words every error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from webtorch.errors import BadRequest
from webtorch.http.messages import JSON, Response
from webtorch.serve.model import TensorSpec
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
    spec_for,
)


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
    doc = parse_json(body, "request body")
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
        spec = spec_for(specs, name, model, kind)
        check_rows(spec, data, kind, max_rows)
        array = json_array(spec.name, data, spec.dtype, kind)
        check_shape(spec, array.shape, kind)
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
        self._plain_output = plain_output(outputs)

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
            data = orjson.dumps(outputs[self.outputs[0].name], option=NUMPY_OPTS)
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
            text = orjson.dumps(array, option=NUMPY_OPTS)
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


def encode_short(outputs: dict[str, np.ndarray], specs: list[TensorSpec]) -> Response:
    if len(specs) == 1:
        doc: Any = {"outputs": json_ready(outputs[specs[0].name], specs[0].dtype)}
    else:
        doc = {"outputs": {t.name: json_ready(outputs[t.name], t.dtype) for t in specs}}
    return Response(200, orjson.dumps(doc, option=NUMPY_OPTS), JSON)
