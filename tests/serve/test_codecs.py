"""The wire forms (serve/wire/): OIP JSON and binary decode, encode, the short form, fuzzing."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webtorch.errors import HTTPError
from webtorch.http.messages import Response
from webtorch.serve.datatypes import DATATYPES
from webtorch.serve.model import TensorSpec
from webtorch.serve.wire.oip_json import OIPForm, decode_oip, encode_oip, validate_requested
from webtorch.serve.wire.short import ShortForm, decode_short, encode_short
from webtorch.serve.wire.tensors import Decoded, rows_array, strict_array

# Floats beyond FP16/FP32 range become inf with a numpy warning; that is accepted, not an error.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

JSON = b"application/json"
OCTET = b"application/octet-stream"

XOR = {"x": TensorSpec("x", "FP32", (-1, 2))}
TWO = {"a": TensorSpec("a", "FP32", (-1, 2)), "b": TensorSpec("b", "INT64", (-1,))}
TEXT = {"t": TensorSpec("t", "BYTES", (-1, 1))}


def specs(*tensors: TensorSpec) -> dict[str, TensorSpec]:
    return {t.name: t for t in tensors}


def oip(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **extra})


def decode_json(body: bytes, model_specs: dict[str, TensorSpec] = XOR) -> Decoded:
    return decode_oip(body, JSON, None, model_specs, "m")


def binary_request(doc: dict[str, Any], *blobs: bytes) -> tuple[bytes, bytes]:
    """A binary tensor extension body and its Inference-Header-Content-Length."""
    header = orjson.dumps(doc)
    return header + b"".join(blobs), str(len(header)).encode()


def bytes_blob(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def parse_response(response: Response) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON header of an OIP response and each output's data (JSON list or raw bytes)."""
    headers = dict(response.headers)
    length = headers.get(b"inference-header-content-length")
    if length is None:
        assert response.content_type == JSON
        doc = orjson.loads(response.body)
        return doc, {o["name"]: o["data"] for o in doc["outputs"]}
    assert response.content_type == OCTET
    doc = orjson.loads(response.body[: int(length)])
    offset = int(length)
    data: dict[str, Any] = {}
    for out in doc["outputs"]:
        if "data" in out:
            data[out["name"]] = out["data"]
            continue
        size = out["parameters"]["binary_data_size"]
        data[out["name"]] = response.body[offset : offset + size]
        offset += size
    assert offset == len(response.body)
    return doc, data


def bad(call: Any, status: int = 400, match: str = "") -> str:
    """Run ``call``; it must raise an HTTPError of ``status`` whose message contains ``match``."""
    with pytest.raises(HTTPError) as info:
        call()
    assert info.value.status == status, info.value.message
    assert match.lower() in info.value.message.lower(), info.value.message
    return info.value.message


# -- OIP JSON decode ------------------------------------------------------------------------------


def test_json_nested_and_flat_data_decode_the_same() -> None:
    nested = decode_json(
        oip({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[0, 1], [1, 1]]})
    )
    flat = decode_json(
        oip({"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [0, 1, 1, 1]})
    )
    for decoded in (nested, flat):
        assert decoded.rows == 2
        array = decoded.inputs["x"]
        assert array.dtype == np.float32 and array.shape == (2, 2)
        assert array.tolist() == [[0.0, 1.0], [1.0, 1.0]]
        assert decoded.requested is None and not decoded.binary and decoded.id is None


def test_json_id_and_requested_outputs() -> None:
    body = oip(
        {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0, 1]},
        id="req-7",
        outputs=[{"name": "y"}, {"name": "z", "parameters": {"binary_data": True}}],
    )
    decoded = decode_json(body)
    assert decoded.id == "req-7"
    assert decoded.requested == ["y", "z"]
    assert decoded.binary == {"z"}


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"shape": [2, 3], "data": [0] * 6}, "shape [2, 3] does not match"),
        ({"shape": [2], "data": [0, 1]}, "shape [2] does not match"),
        ({"shape": [1, 2, 1], "data": [0, 1]}, "does not match"),
        ({"shape": "2,2", "data": [0] * 4}, "shape must be a list"),
        ({"shape": [-1, 2], "data": [0, 1]}, "non-negative"),
        ({"shape": [1.0, 2], "data": [0, 1]}, "shape must be a list"),
        ({"shape": [True, 2], "data": [0, 1]}, "shape must be a list"),
        ({"shape": [2, 2], "data": [0, 1, 1]}, "3 elements do not fill shape [2, 2]"),
        ({"shape": [1, 2]}, "neither data nor binary_data_size"),
        ({"shape": [0, 2], "data": []}, "empty batch"),
        ({"shape": [2, 2], "data": [[0, 1], [1]]}, "ragged"),
        ({"shape": [1, 2], "data": ["0", "1"]}, "must be FP32 numbers"),
        ({"shape": [1, 2], "data": [0, "1"]}, "must be FP32 numbers"),
        ({"shape": [1, 2], "data": [True, False]}, "must be FP32 numbers"),
        ({"shape": [1, 2], "data": [None, 1]}, "must be FP32 numbers"),
        ({"shape": [1, 2], "data": [{"a": 1}, 1]}, "must be FP32 numbers"),
        ({"shape": [1, 2], "data": [0, 1], "parameters": [1]}, "parameters must be an object"),
    ],
)
def test_json_input_errors_name_the_problem(entry: dict[str, Any], match: str) -> None:
    message = bad(lambda: decode_json(oip({"name": "x", "datatype": "FP32", **entry})), match=match)
    assert "'x'" in message or "batch" in message


@pytest.mark.parametrize(
    ("datatype", "match"),
    [
        ("FP64", "datatype FP64 does not match the model's FP32"),
        ("FLOAT32", "datatype 'FLOAT32' does not match"),
        (None, "datatype None does not match"),
        ([1], "datatype [1] does not match"),
        ({"a": 1}, "does not match"),
    ],
)
def test_datatype_must_match(datatype: Any, match: str) -> None:
    body = oip({"name": "x", "datatype": datatype, "shape": [1, 2], "data": [0, 1]})
    bad(lambda: decode_json(body), match=match)


def test_unknown_input_name() -> None:
    body = oip({"name": "z", "datatype": "FP32", "shape": [1, 2], "data": [0, 1]})
    bad(lambda: decode_json(body), match="unknown input 'z' for model 'm'; expected x")
    body = oip({"datatype": "FP32", "shape": [1, 2], "data": [0, 1]})
    bad(lambda: decode_json(body), match="unknown input None")


def test_missing_input_and_duplicate_input_and_batch_mismatch() -> None:
    a = {"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [0, 1]}
    bad(lambda: decode_json(oip(a), TWO), match="needs input(s) b")
    bad(lambda: decode_json(oip(a, a), TWO), match="input 'a' given twice")
    b = {"name": "b", "datatype": "INT64", "shape": [2], "data": [3, 4]}
    bad(lambda: decode_json(oip(a, b), TWO), match="same batch size")
    b["shape"], b["data"] = [1], [3]
    decoded = decode_json(oip(a, b), TWO)
    assert decoded.rows == 1 and decoded.inputs["b"].dtype == np.int64


def test_bf16_in_json_rejected() -> None:
    model = specs(TensorSpec("h", "BF16", (-1,)))
    body = oip({"name": "h", "datatype": "BF16", "shape": [2], "data": [1.0, 2.0]})
    bad(lambda: decode_json(body, model), match="BF16 tensors must use the binary data extension")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"{", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"inputs"', "must be a JSON object"),
        (b"{}", 'non-empty "inputs"'),
        (b'{"inputs": []}', 'non-empty "inputs"'),
        (b'{"inputs": {"x": [0, 1]}}', 'non-empty "inputs"'),
        (b'{"inputs": [[0, 1]]}', "each input must be an object"),
    ],
)
def test_bad_documents(body: bytes, match: str) -> None:
    bad(lambda: decode_json(body), match=match)


@pytest.mark.parametrize("content_type", [b"application/xml", b"image/png", b"multipart/form-data"])
def test_wrong_content_type_is_415(content_type: bytes) -> None:
    body = oip({"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0, 1]})
    bad(lambda: decode_oip(body, content_type, None, XOR, "m"), 415, "unsupported content type")
    bad(lambda: decode_short(b'{"inputs": [[0, 1]]}', content_type, XOR, "m"), 415)


@pytest.mark.parametrize(
    "content_type",
    [b"", JSON, b"text/plain", b"application/x-www-form-urlencoded", b"application/vnd.x+json"],
)
def test_json_content_types_accepted(content_type: bytes) -> None:
    body = oip({"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0, 1]})
    assert decode_oip(body, content_type, None, XOR, "m").rows == 1
    assert decode_short(b'{"inputs": [[0, 1]]}', content_type, XOR, "m").rows == 1


def test_octet_stream_without_header_length() -> None:
    bad(
        lambda: decode_oip(b"\x00" * 8, OCTET, None, XOR, "m"),
        match="Inference-Header-Content-Length",
    )


# -- binary tensor extension ----------------------------------------------------------------------


def test_binary_input_is_a_view_of_the_body() -> None:
    values = np.array([[0, 1], [1, 0], [1, 1]], dtype="<f4")
    doc = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [3, 2],
                "parameters": {"binary_data_size": 24},
            }
        ]
    }
    body, length = binary_request(doc, values.tobytes())
    decoded = decode_oip(body, OCTET, length, XOR, "m")
    array = decoded.inputs["x"]
    assert decoded.rows == 3
    np.testing.assert_array_equal(array, values)
    assert np.shares_memory(array, np.frombuffer(body, dtype=np.uint8))  # zero-copy


def test_binary_header_with_json_data_only() -> None:
    # The header length may cover the whole body: no binary section at all.
    body, length = binary_request(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 0]}]}
    )
    decoded = decode_oip(body, JSON, length, XOR, "m")
    assert decoded.inputs["x"].tolist() == [[1.0, 0.0]]


def test_mixed_json_and_binary_inputs() -> None:
    ints = np.array([7, -3], dtype="<i8")
    doc = {
        "inputs": [
            {
                "name": "b",
                "datatype": "INT64",
                "shape": [2],
                "parameters": {"binary_data_size": 16},
            },
            {"name": "a", "datatype": "FP32", "shape": [2, 2], "data": [[0, 1], [2, 3]]},
        ],
        "parameters": {"binary_data_output": True},
    }
    body, length = binary_request(doc, ints.tobytes())
    decoded = decode_oip(body, OCTET, length, TWO, "m")
    assert decoded.rows == 2
    assert decoded.inputs["b"].tolist() == [7, -3]
    assert decoded.inputs["a"].tolist() == [[0, 1], [2, 3]]
    assert decoded.binary_default


def test_two_binary_inputs_are_consumed_in_order() -> None:
    a = np.arange(4, dtype="<f4").reshape(2, 2)
    b = np.array([5, 6], dtype="<i8")
    doc = {
        "inputs": [
            {
                "name": "a",
                "datatype": "FP32",
                "shape": [2, 2],
                "parameters": {"binary_data_size": 16},
            },
            {
                "name": "b",
                "datatype": "INT64",
                "shape": [2],
                "parameters": {"binary_data_size": 16},
            },
        ]
    }
    body, length = binary_request(doc, a.tobytes(), b.tobytes())
    decoded = decode_oip(body, OCTET, length, TWO, "m")
    np.testing.assert_array_equal(decoded.inputs["a"], a)
    np.testing.assert_array_equal(decoded.inputs["b"], b)


def _x_binary(size: Any, blob: bytes, header_length: bytes | None = None) -> Any:
    doc = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [1, 2],
                "parameters": {"binary_data_size": size},
            }
        ]
    }
    body, length = binary_request(doc, blob)
    return lambda: decode_oip(body, OCTET, header_length or length, XOR, "m")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (_x_binary(8, b"\x00" * 4), "binary_data_size exceeds the body"),
        (_x_binary(4, b"\x00" * 4), "binary_data_size 4 != 2 x 4 bytes for FP32 [1, 2]"),
        (_x_binary(8, b"\x00" * 12), "4 bytes of binary data are not claimed"),
        (_x_binary(-8, b"\x00" * 8), "binary_data_size must be a non-negative integer, not -8"),
        (_x_binary("8", b"\x00" * 8), "binary_data_size must be a non-negative integer, not '8'"),
        (_x_binary(True, b"\x00" * 8), "binary_data_size must be a non-negative integer, not True"),
        (_x_binary(8, b"\x00" * 8, b"abc"), "not an integer"),
        (_x_binary(8, b"\x00" * 8, b"100000"), "exceeds the body"),
        (_x_binary(8, b"\x00" * 8, b"-1"), "exceeds the body"),
        (_x_binary(8, b"\x00" * 8, b"10"), "not valid JSON"),
    ],
)
def test_binary_sizes_that_do_not_add_up(call: Any, match: str) -> None:
    bad(call, match=match)


def test_binary_data_size_without_header_length() -> None:
    doc = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [1, 2],
                "parameters": {"binary_data_size": 8},
            }
        ]
    }
    bad(
        lambda: decode_oip(orjson.dumps(doc), JSON, None, XOR, "m"),
        match="no Inference-Header-Content-Length",
    )


def test_binary_bytes_length_prefixed() -> None:
    items = [b"hello", b"", b"\x00\xff\x01", "héllo".encode()]
    doc = {
        "inputs": [
            {
                "name": "t",
                "datatype": "BYTES",
                "shape": [4, 1],
                "parameters": {"binary_data_size": len(bytes_blob(items))},
            }
        ]
    }
    body, length = binary_request(doc, bytes_blob(items))
    decoded = decode_oip(body, OCTET, length, TEXT, "m")
    array = decoded.inputs["t"]
    assert array.dtype == object and array.shape == (4, 1)
    assert array.ravel().tolist() == items


@pytest.mark.parametrize(
    ("blob", "shape", "match"),
    [
        (struct.pack("<I", 3) + b"abc\x05\x00", [2, 1], "truncated BYTES element length"),
        (struct.pack("<I", 10) + b"abc", [1, 1], "truncated BYTES element"),
        (bytes_blob([b"abc", b"def"]), [3, 1], "2 BYTES elements do not fill [3, 1]"),
        # Counted against the shape before and while splitting, not after (issue 19, item 13).
        (b"\x05\x00", [1, 1], "binary_data_size 2 cannot hold the 1 BYTES elements"),
        (bytes_blob([b""] * 5), [2, 1], "more BYTES elements than its shape holds (2)"),
    ],
)
def test_binary_bytes_errors(blob: bytes, shape: list[int], match: str) -> None:
    doc = {
        "inputs": [
            {
                "name": "t",
                "datatype": "BYTES",
                "shape": shape,
                "parameters": {"binary_data_size": len(blob)},
            }
        ]
    }
    body, length = binary_request(doc, blob)
    bad(lambda: decode_oip(body, OCTET, length, TEXT, "m"), match=match)


def test_json_bytes_elements() -> None:
    body = oip({"name": "t", "datatype": "BYTES", "shape": [2, 1], "data": ["ab", "ç"]})
    decoded = decode_json(body, TEXT)
    assert decoded.inputs["t"].ravel().tolist() == [b"ab", "ç".encode()]
    body = oip({"name": "t", "datatype": "BYTES", "shape": [2, 1], "data": ["ab", 3]})
    bad(lambda: decode_json(body, TEXT), match="BYTES data must be strings")
    body = oip({"name": "t", "datatype": "BYTES", "shape": [2, 1], "data": [["a"], "b"]})
    bad(lambda: decode_json(body, TEXT), match="ragged")


def test_deeply_nested_data_is_a_400_not_a_crash() -> None:
    # orjson accepts 1024 levels, more than Python's default recursion limit.
    deep = b"[" * 1020 + b'"a"' + b"]" * 1020
    bad(
        lambda: decode_short(b'{"inputs": ' + deep + b"}", JSON, TEXT, "m"),
        match="nested more than 32",
    )
    deep_num = b"[" * 1020 + b"1" + b"]" * 1020
    bad(lambda: decode_short(b'{"inputs": ' + deep_num + b"}", JSON, XOR, "m"))
    body = (
        b'{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1, 1], "data": ' + deep + b"}]}"
    )
    bad(lambda: decode_json(body, TEXT), match="nested")
    body = b'{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1, 1], "data": [["a"]]}]}'
    assert decode_json(body, TEXT).inputs["t"].tolist() == [[b"a"]]


# -- the short form -------------------------------------------------------------------------------


def test_short_form_single_input() -> None:
    decoded = decode_short(b'{"inputs": [[0, 1], [1, 1]]}', JSON, XOR, "xor")
    assert decoded.rows == 2
    assert decoded.inputs["x"].dtype == np.float32
    assert decoded.inputs["x"].tolist() == [[0, 1], [1, 1]]


def test_short_form_named_inputs() -> None:
    decoded = decode_short(b'{"inputs": {"a": [[0, 1]], "b": [5]}}', JSON, TWO, "m")
    assert decoded.rows == 1 and decoded.inputs["b"].tolist() == [5]
    bad(lambda: decode_short(b'{"inputs": [[0, 1]]}', JSON, TWO, "m"), match="several inputs")
    bad(
        lambda: decode_short(b'{"inputs": {"a": [[0, 1]]}}', JSON, TWO, "m"),
        match="needs input(s) b",
    )
    bad(lambda: decode_short(b'{"inputs": {"c": [1]}}', JSON, TWO, "m"), match="unknown input 'c'")


def test_short_form_bytes_keeps_the_nesting_shape() -> None:
    decoded = decode_short(b'{"inputs": [["a"], ["bc"]]}', JSON, TEXT, "m")
    assert decoded.rows == 2
    assert decoded.inputs["t"].shape == (2, 1)
    bad(lambda: decode_short(b'{"inputs": ["a", "bc"]}', JSON, TEXT, "m"), match="shape [2]")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"nope", "not valid JSON"),
        (b"[[0, 1]]", 'with "inputs"'),
        (b'{"input": [[0, 1]]}', 'with "inputs"'),
        (b'{"inputs": [0, 1]}', "shape [2] does not match"),
        (b'{"inputs": [[0, 1, 2]]}', "shape [1, 3] does not match the model's [-1, 2]"),
        (b'{"inputs": [["a", "b"]]}', "must be FP32 numbers"),
        (b'{"inputs": [[0, 1], [1]]}', "ragged"),
        (b'{"inputs": []}', "shape [0] does not match"),
        (b'{"inputs": 1}', "shape [] does not match"),
    ],
)
def test_short_form_errors(body: bytes, match: str) -> None:
    bad(lambda: decode_short(body, JSON, XOR, "xor"), match=match)


def test_encode_short() -> None:
    y = TensorSpec("y", "FP32", (-1, 1))
    one = encode_short({"y": np.array([[0.5], [0.25]], dtype=np.float32)}, [y])
    assert one.status == 200 and one.content_type == JSON
    assert orjson.loads(one.body) == {"outputs": [[0.5], [0.25]]}
    z = TensorSpec("z", "BYTES", (-1,))
    two = encode_short(
        {"y": np.array([[1.0]], dtype=np.float32), "z": np.array([b"ok"], dtype=object)}, [y, z]
    )
    assert orjson.loads(two.body) == {"outputs": {"y": [[1.0]], "z": ["ok"]}}


@pytest.mark.parametrize(
    ("shape", "counts"),
    [
        ((5, 3), [1, 1, 1, 1, 1]),
        ((6, 2), [1, 3, 2]),
        ((4,), [2, 1, 1]),
        ((3, 0), [1, 2]),
        ((1, 4), [1]),
    ],
)
@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT64", "BOOL"])
def test_encode_batch_matches_encoding_each_request(
    shape: tuple[int, ...], counts: list[int], datatype: str
) -> None:
    """A batch's responses from one dumps are byte for byte those of request-by-request encoding,
    NaN (null) and awkward floats included."""
    spec = TensorSpec("y", datatype, (-1,) * len(shape))
    rng = np.random.default_rng(len(counts))
    array = (rng.standard_normal(shape) * 1e6).astype(DATATYPES[datatype].numpy)
    if datatype.startswith("FP") and array.size:
        array.flat[0] = np.nan
    form = ShortForm([TensorSpec("x", "FP32", (-1, 2))], [spec], "m")
    together = form.encode_batch({"y": array}, counts)
    assert together is not None
    starts = np.cumsum([0, *counts])
    one_by_one = [form.encode({"y": array[a:b]}) for a, b in itertools.pairwise(starts)]
    assert [r.body for r in together] == [r.body for r in one_by_one]
    assert all(r.status == 200 and r.content_type == JSON for r in together)


def test_encode_batch_declines_what_it_cannot_split() -> None:
    inputs = [TensorSpec("x", "FP32", (-1, 2))]
    cube = ShortForm(inputs, [TensorSpec("y", "FP32", (-1, 2, 2))], "m")
    assert cube.encode_batch({"y": np.zeros((2, 2, 2), dtype=np.float32)}, [1, 1]) is None
    two = ShortForm(inputs, [TensorSpec("y", "FP32", (-1, 1)), TensorSpec("z", "FP32", (-1,))], "m")
    outputs = {"y": np.zeros((2, 1), dtype=np.float32), "z": np.zeros(2, dtype=np.float32)}
    assert two.encode_batch(outputs, [1, 1]) is None


# -- encode ---------------------------------------------------------------------------------------

Y = TensorSpec("y", "FP32", (-1, 2))
Z = TensorSpec("z", "INT32", (-1,))
OUTS = {
    "y": np.array([[1.5, 2.5], [3.5, 4.5]], dtype=np.float32),
    "z": np.array([7, 8], dtype=np.int32),
}


def test_encode_json_outputs_flat_row_major_with_id() -> None:
    decoded = Decoded({}, 2, id="abc")
    response = encode_oip("m", "3", decoded, OUTS, [Y, Z])
    assert response.status == 200 and not response.headers
    doc, _ = parse_response(response)
    assert doc["model_name"] == "m" and doc["model_version"] == "3" and doc["id"] == "abc"
    assert doc["outputs"][0] == {
        "name": "y",
        "datatype": "FP32",
        "shape": [2, 2],
        "data": [1.5, 2.5, 3.5, 4.5],
    }
    assert doc["outputs"][1] == {"name": "z", "datatype": "INT32", "shape": [2], "data": [7, 8]}
    assert "id" not in orjson.loads(encode_oip("m", "3", Decoded({}, 2), OUTS, [Y, Z]).body)


def test_encode_binary_data_output_for_all() -> None:
    decoded = Decoded({}, 2, binary_default=True)
    response = encode_oip("m", "1", decoded, OUTS, [Y, Z])
    doc, data = parse_response(response)
    assert [o["name"] for o in doc["outputs"]] == ["y", "z"]
    assert all("data" not in o for o in doc["outputs"])
    assert np.frombuffer(data["y"], "<f4").reshape(2, 2).tolist() == OUTS["y"].tolist()
    assert np.frombuffer(data["z"], "<i4").tolist() == [7, 8]


def test_encode_requested_outputs_mixed_binary_and_json() -> None:
    body = oip(
        {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [0] * 4},
        outputs=[{"name": "z", "parameters": {"binary_data": True}}, {"name": "y"}],
    )
    decoded = decode_json(body)
    validate_requested(decoded, [Y, Z], "m")
    doc, data = parse_response(encode_oip("m", "1", decoded, OUTS, [Y, Z]))
    assert [o["name"] for o in doc["outputs"]] == ["z", "y"]
    assert np.frombuffer(data["z"], "<i4").tolist() == [7, 8]
    assert data["y"] == [1.5, 2.5, 3.5, 4.5]


def test_encode_requested_subset_with_binary_default() -> None:
    body = oip(
        {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [0] * 4},
        outputs=[{"name": "y"}, {"name": "z", "parameters": {"binary_data": False}}],
        parameters={"binary_data_output": True},
    )
    decoded = decode_json(body)
    _, data = parse_response(encode_oip("m", "1", decoded, OUTS, [Y, Z]))
    assert isinstance(data["y"], bytes) and data["z"] == [7, 8]
    only = decode_json(
        oip(
            {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [0] * 4},
            outputs=[{"name": "z"}],
        )
    )
    _, data = parse_response(encode_oip("m", "1", only, OUTS, [Y, Z]))
    assert list(data) == ["z"]


def test_unknown_requested_output() -> None:
    body = oip(
        {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0, 1]}, outputs=[{"name": "w"}]
    )
    decoded = decode_json(body)
    bad(lambda: validate_requested(decoded, [Y, Z], "m"), match="unknown output 'w' for model 'm'")
    for outputs in ([{"nam": "y"}], {"name": "y"}, ["y"]):
        body = oip(
            {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0, 1]}, outputs=outputs
        )
        bad(lambda b=body: decode_json(b), match="output")


# -- every datatype round-trips -------------------------------------------------------------------

SAMPLES: dict[str, list[Any]] = {
    "BOOL": [True, False, False, True],
    "UINT8": [0, 1, 128, 255],
    "UINT16": [0, 1, 40000, 65535],
    "UINT32": [0, 1, 2**31, 2**32 - 1],
    "UINT64": [0, 1, 2**63, 2**64 - 1],
    "INT8": [-128, -1, 0, 127],
    "INT16": [-(2**15), -1, 0, 2**15 - 1],
    "INT32": [-(2**31), -1, 0, 2**31 - 1],
    "INT64": [-(2**63), -1, 0, 2**63 - 1],
    "FP16": [-2.0, 0.5, 65504.0, 0.0009765625],
    "BF16": [1.0, -2.5, 3.0e38, 0.0078125],
    "FP32": [-1.5, 0.0, 3.4028235e38, 1.0e-30],
    "FP64": [-1.5, 0.1, 1.0e300, 5.0e-324],
    "BYTES": [b"", b"a", "ü".encode(), b"\x00\xff"],
}


def sample(name: str) -> np.ndarray:
    """The sample values as the datatype's numpy carrier, shape (2, 2)."""
    values = SAMPLES[name]
    if name == "BYTES":
        return np.array(values, dtype=object).reshape(2, 2)
    if name == "BF16":
        return torch.tensor(values, dtype=torch.bfloat16).view(torch.uint16).numpy().reshape(2, 2)
    return np.array(values, dtype=DATATYPES[name].numpy).reshape(2, 2)


def test_samples_cover_every_datatype() -> None:
    assert set(SAMPLES) == set(DATATYPES)


def _blob(name: str, array: np.ndarray) -> bytes:
    if name == "BYTES":
        return bytes_blob(list(array.ravel()))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


@pytest.mark.parametrize("name", list(SAMPLES))
def test_datatype_binary_round_trip(name: str) -> None:
    spec = TensorSpec("v", name, (-1, 2))
    array = sample(name)
    blob = _blob(name, array)
    doc = {
        "inputs": [
            {
                "name": "v",
                "datatype": name,
                "shape": [2, 2],
                "parameters": {"binary_data_size": len(blob)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    body, length = binary_request(doc, blob)
    decoded = decode_oip(body, OCTET, length, {"v": spec}, "m")
    got = decoded.inputs["v"]
    assert got.shape == (2, 2)
    assert got.dtype == DATATYPES[name].numpy or (
        name != "BYTES" and got.dtype.newbyteorder("=") == DATATYPES[name].numpy
    )
    assert got.tolist() == array.tolist()
    response = encode_oip("m", "1", decoded, {"v": got}, [spec])
    out_doc, data = parse_response(response)
    assert out_doc["outputs"] == [
        {
            "name": "v",
            "datatype": name,
            "shape": [2, 2],
            "parameters": {"binary_data_size": len(blob)},
        }
    ]
    assert data["v"] == blob


@pytest.mark.parametrize("name", [n for n in SAMPLES if n not in ("BF16",)])
def test_datatype_json_round_trip(name: str) -> None:
    spec = TensorSpec("v", name, (-1, 2))
    array = sample(name)
    if name == "BYTES":
        array = np.array([b"", b"a", "ü".encode(), b"tail"], dtype=object).reshape(2, 2)
        data: list[Any] = [v.decode() for v in array.ravel()]
    else:
        data = array.ravel().tolist()
    body = oip({"name": "v", "datatype": name, "shape": [2, 2], "data": data})
    decoded = decode_json(body, {"v": spec})
    got = decoded.inputs["v"]
    assert got.shape == (2, 2)
    if name != "BYTES":
        assert got.dtype == DATATYPES[name].numpy
    assert got.tolist() == array.tolist()
    out_doc, out = parse_response(encode_oip("m", "1", decoded, {"v": got}, [spec]))
    assert out_doc["outputs"][0]["datatype"] == name and out_doc["outputs"][0]["shape"] == [2, 2]
    if name in ("FP16", "FP32"):  # the shortest text that round-trips in that precision
        assert np.array(out["v"], dtype=got.dtype).tolist() == got.ravel().tolist()
    else:
        assert out["v"] == data
    # and back in: what the server answers decodes to the same tensor
    again = decode_json(
        oip({"name": "v", "datatype": name, "shape": [2, 2], "data": out["v"]}), {"v": spec}
    )
    assert again.inputs["v"].tolist() == array.tolist()


def test_bf16_json_output_is_the_float_value() -> None:
    spec = TensorSpec("v", "BF16", (-1, 2))
    _, out = parse_response(encode_oip("m", "1", Decoded({}, 2), {"v": sample("BF16")}, [spec]))
    expected = torch.tensor(SAMPLES["BF16"], dtype=torch.bfloat16).float().tolist()
    assert out["v"] == pytest.approx(expected)


def test_narrowing_json_values_are_cast_to_the_model_dtype() -> None:
    spec = {"v": TensorSpec("v", "UINT8", (-1,))}
    decoded = decode_json(
        oip({"name": "v", "datatype": "UINT8", "shape": [2], "data": [1, 2]}), spec
    )
    assert decoded.inputs["v"].dtype == np.uint8


# -- the per-model fast paths agree with the general decoders ------------------------------------


def forms(model_specs: dict[str, TensorSpec]) -> tuple[ShortForm, OIPForm]:
    inputs = list(model_specs.values())
    outputs = [TensorSpec("y", "FP32", (-1, 1))]
    return ShortForm(inputs, outputs, "m"), OIPForm(inputs, outputs, "m", "1")


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        assert a[name].tolist() == b[name].tolist()


@pytest.mark.parametrize(
    ("name", "shape", "data"),
    [
        ("FP32", (-1, 2), [[0, 1], [1, 1]]),
        ("FP16", (-1, 2), [[0.5, 1], [1, 1]]),
        ("INT8", (-1,), [-128, 127]),
        ("UINT8", (-1,), [0, 255]),
        ("UINT64", (-1,), [0, 2**64 - 1]),
        ("INT64", (-1,), [-(2**63), 2**63 - 1]),
        ("INT32", (-1,), [1.0, 2.0]),
        ("BOOL", (-1,), [True, False]),
        ("FP64", (-1, 1), [[1e300], [5e-324]]),
    ],
)
def test_fast_paths_decode_like_the_general_decoders(
    name: str, shape: tuple[int, ...], data: list[Any]
) -> None:
    model = {"v": TensorSpec("v", name, shape)}
    short, form = forms(model)
    body = orjson.dumps({"inputs": data})
    inputs, rows = short.decode(body, JSON)
    general = decode_short(body, JSON, model, "m")
    # Fixed-width float rows stay JSON lists until the batch converts them (rows_array).
    converted = {
        k: rows_array([v], model[k]) if isinstance(v, list) else v for k, v in inputs.items()
    }
    same(converted, general.inputs)
    assert rows == general.rows
    array = np.array(data)
    body = oip({"name": "v", "datatype": name, "shape": list(array.shape), "data": data}, id="3")
    fast = form.decode(body, JSON, None)
    slow = decode_json(body, model)
    same(
        {
            k: rows_array([v], model[k]) if isinstance(v, list) else v
            for k, v in fast.inputs.items()
        },
        slow.inputs,
    )
    assert fast.rows == slow.rows and fast.id == slow.id == "3"


def test_short_form_keeps_float_rows_as_json_lists_for_the_batch() -> None:
    model = {"v": TensorSpec("v", "FP32", (-1, 2))}
    short, _ = forms(model)
    inputs, rows = short.decode(b'{"inputs": [[0, 1], [1, "x"]]}', JSON)
    assert rows == 2 and inputs["v"] == [[0, 1], [1, "x"]]  # elements are the batch's to check
    assert rows_array([[[0, 1]], [[1, 0.5]]], model["v"]).tolist() == [[0, 1], [1, 0.5]]  # type: ignore[union-attr]
    assert rows_array([[[0, 1]], [[1, "x"]]], model["v"]) is None
    assert rows_array([[[0, None]]], model["v"]) is None
    assert rows_array([[[True, False]]], model["v"]) is None  # booleans are not FP32 numbers
    # A nested list among the numbers, first or later, in one request of several.
    assert rows_array([[[0, 1]], [[[1], 2]]], model["v"]) is None
    assert rows_array([[[0, 1]], [[1, [2]]]], model["v"]) is None
    assert rows_array([[[[0, 1], [2, 3]]]], model["v"]) is None
    several = rows_array([[[0, 1], [2, 3.5]], [[4, 5]]], model["v"])
    assert several is not None and several.dtype == np.float32
    assert several.tolist() == [[0, 1], [2, 3.5], [4, 5]]
    bad(lambda: strict_array(model["v"], [[1, "x"]]), match="must be FP32 numbers")
    # a wrong width never takes the list path
    bad(lambda: short.decode(b'{"inputs": [[0, 1, 2]]}', JSON), match="shape")


@pytest.mark.parametrize(
    ("name", "data"),
    [("UINT8", [1, 256]), ("INT8", [-129, 0]), ("UINT64", [-1, 0]), ("INT64", [2**63, 0])],
)
def test_fast_paths_check_integer_ranges(name: str, data: list[Any]) -> None:
    model = {"v": TensorSpec("v", name, (-1,))}
    short, form = forms(model)
    bad(lambda: short.decode(orjson.dumps({"inputs": data}), JSON), match="out of range")
    body = oip({"name": "v", "datatype": name, "shape": [2], "data": data})
    bad(lambda: form.decode(body, JSON, None), match="out of range")


def test_fast_paths_fall_back_for_errors_and_binary() -> None:
    short, form = forms(XOR)
    bad(lambda: short.decode(b'{"inputs": [[0, 1, 2]]}', JSON), match="shape [1, 3]")
    bad(lambda: short.decode(b"{", JSON), match="not valid JSON")
    bad(lambda: short.decode(b'{"inputs": [[0, 1]]}', b"text/html"), 415)
    unhashable = oip({"name": [1], "datatype": "FP32", "shape": [1, 2], "data": [0, 1]})
    bad(lambda: form.decode(unhashable, JSON, None), match="unknown input [1]")
    values = np.array([[1, 0]], dtype="<f4")
    header = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [1, 2],
                "parameters": {"binary_data_size": 8},
            }
        ]
    }
    body, length = binary_request(header, values.tobytes())
    assert form.decode(body, OCTET, length).inputs["x"].tolist() == [[1.0, 0.0]]
    requested = oip(
        {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0, 1]}, outputs=[{"name": "w"}]
    )
    bad(lambda: form.decode(requested, JSON, None), match="unknown output 'w'")


def test_fast_encoders_match_the_general_ones() -> None:
    y = TensorSpec("y", "FP32", (-1, 1))
    short = ShortForm([XOR["x"]], [y], "m")
    form = OIPForm([XOR["x"]], [y], "m", "4")
    outputs = {"y": np.array([[0.25], [0.5]], dtype=np.float32)}
    assert orjson.loads(short.encode(outputs).body) == orjson.loads(encode_short(outputs, [y]).body)
    for decoded in (Decoded({}, 2, id="q"), Decoded({}, 2), Decoded({}, 2, binary_default=True)):
        fast = form.encode(decoded, outputs)
        slow = encode_oip("m", "4", decoded, outputs, [y])
        assert parse_response(fast) == parse_response(slow)


# -- fuzzing: only ever a 4xx HTTPError -----------------------------------------------------------

FUZZ_SPECS = specs(
    TensorSpec("x", "FP32", (-1, 2)),
    TensorSpec("t", "BYTES", (-1,)),
    TensorSpec("h", "BF16", (-1, 1)),
    TensorSpec("i", "INT64", (-1, -1)),
    TensorSpec("b", "BOOL", (-1,)),
)
FUZZ_OUTPUTS = [TensorSpec("y", "FP32", (-1, 1)), TensorSpec("s", "BYTES", (-1,))]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=24,
)
names = st.sampled_from(["x", "t", "h", "i", "b", "z"]) | json_values
datatypes = st.sampled_from([*DATATYPES, "FLOAT"]) | json_values
shapes = st.lists(st.integers(min_value=-1, max_value=4), max_size=3) | json_values
params = (
    st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-2, 40) | json_values})
    | json_values
)
input_entries = st.fixed_dictionaries(
    {},
    optional={
        "name": names,
        "datatype": datatypes,
        "shape": shapes,
        "data": json_values,
        "parameters": params,
    },
)
requested = st.lists(
    st.fixed_dictionaries(
        {}, optional={"name": st.sampled_from(["y", "s", "q"]) | json_values, "parameters": params}
    ),
    max_size=3,
)
documents = st.fixed_dictionaries(
    {"inputs": st.lists(input_entries, max_size=3) | json_values},
    optional={
        "id": json_values,
        "outputs": requested | json_values,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": json_values})
        | json_values,
    },
)
content_types = st.sampled_from([b"", JSON, OCTET, b"text/plain", b"text/html", b"x/y+json"])
header_lengths = (
    st.none() | st.integers(-5, 300).map(lambda n: str(n).encode()) | st.binary(max_size=6)
)

FUZZ_FORMS = forms(FUZZ_SPECS)
XOR_FORMS = forms(XOR)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure is reproducible, never flaky
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def only_4xx(call: Any) -> None:
    try:
        call()
    except HTTPError as exc:
        assert 400 <= exc.status < 500, exc


def _oip(body: bytes, content_type: bytes, header_length: bytes | None) -> None:
    decoded = decode_oip(body, content_type, header_length, FUZZ_SPECS, "fuzz")
    validate_requested(decoded, FUZZ_OUTPUTS, "fuzz")
    assert decoded.rows >= 1
    assert set(decoded.inputs) == set(FUZZ_SPECS)


def _forms(body: bytes, content_type: bytes, header_length: bytes | None) -> None:
    for short, form in (FUZZ_FORMS, XOR_FORMS):
        only_4xx(lambda s=short: s.decode(body, content_type))
        only_4xx(lambda f=form: f.decode(body, content_type, header_length))


@FUZZ
@given(doc=json_values, content_type=content_types)
def test_fuzz_arbitrary_json_documents(doc: Any, content_type: bytes) -> None:
    body = orjson.dumps(doc)
    only_4xx(lambda: _oip(body, content_type, None))
    only_4xx(lambda: decode_short(body, content_type, FUZZ_SPECS, "fuzz"))
    only_4xx(lambda: decode_short(body, content_type, XOR, "fuzz"))
    _forms(body, content_type, None)


@FUZZ
@given(doc=documents, content_type=content_types)
def test_fuzz_oip_shaped_documents(doc: dict[str, Any], content_type: bytes) -> None:
    body = orjson.dumps(doc)
    only_4xx(lambda: _oip(body, content_type, None))
    only_4xx(lambda: decode_short(body, content_type, FUZZ_SPECS, "fuzz"))
    _forms(body, content_type, None)


@FUZZ
@given(
    doc=documents, tail=st.binary(max_size=48), content_type=content_types, slack=st.integers(-3, 3)
)
def test_fuzz_binary_extension(
    doc: dict[str, Any], tail: bytes, content_type: bytes, slack: int
) -> None:
    header = orjson.dumps(doc)
    body = header + tail
    length = str(len(header) + slack).encode()
    only_4xx(lambda: _oip(body, content_type, length))
    _forms(body, content_type, length)


@FUZZ
@given(body=st.binary(max_size=200), content_type=content_types, header_length=header_lengths)
def test_fuzz_arbitrary_bytes(
    body: bytes, content_type: bytes, header_length: bytes | None
) -> None:
    only_4xx(lambda: _oip(body, content_type, header_length))
    only_4xx(lambda: decode_short(body, content_type, FUZZ_SPECS, "fuzz"))
    _forms(body, content_type, header_length)


@pytest.mark.parametrize("req_id", [None, "3", 'quote " and \\ backslash', "ünïcode"])
@pytest.mark.parametrize("rows", [1, 3])
def test_oip_template_encoding_matches_the_general_encoder(req_id: str | None, rows: int) -> None:
    inputs = [TensorSpec("x", "FP32", (-1, 2))]
    outputs = [TensorSpec("y", "FP32", (-1, 1))]
    form = OIPForm(inputs, outputs, 'model "m"', "7")
    array = np.linspace(0, 1, rows, dtype=np.float32).reshape(rows, 1)
    decoded = Decoded({}, rows, req_id)
    fast = form.encode(decoded, {"y": array})
    general = encode_oip('model "m"', "7", decoded, {"y": array}, outputs)
    assert orjson.loads(fast.body) == orjson.loads(general.body)
    assert fast.content_type == general.content_type
