"""The Open Inference Protocol's binary tensor data extension: a tensor's raw bytes follow the
JSON document (whose length ``Inference-Header-Content-Length`` gives), little-endian, BYTES
elements each prefixed by its 4-byte length. Inputs become zero-copy views of the body.
"""

from __future__ import annotations

import struct
from math import prod
from typing import Final

import numpy as np

from webtorch.errors import BadRequest
from webtorch.http.messages import Response
from webtorch.serve.datatypes import Datatype

OCTET: Final = b"application/octet-stream"


def json_length(header_length: bytes, body: bytes) -> int:
    """The length of the JSON document that starts ``body``, from its
    Inference-Header-Content-Length: the tensors' bytes start there."""
    try:
        json_len = int(header_length)
    except ValueError:
        raise BadRequest("Inference-Header-Content-Length is not an integer") from None
    if not 0 <= json_len <= len(body):
        raise BadRequest("Inference-Header-Content-Length exceeds the body")
    return json_len


def binary_array(
    name: str, data: memoryview, dt: Datatype, shape: list[int], kind: str = "input"
) -> np.ndarray:
    """One tensor's ``binary_data_size`` bytes as an array of ``shape`` (a view of the body,
    except BYTES); BadRequest where the bytes do not fill the shape exactly."""
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


def output_blob(array: np.ndarray, datatype: str) -> bytes:
    """An output tensor's binary data: little-endian, or length-prefixed BYTES elements."""
    if datatype == "BYTES":
        return _bytes_payload(array)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def binary_response(header: bytes, blobs: list[bytes]) -> Response:
    """The JSON ``header`` followed by the outputs' binary data, in the order it lists them."""
    return Response(
        200,
        b"".join([header, *blobs]),
        OCTET,
        [(b"inference-header-content-length", b"%d" % len(header))],
    )
