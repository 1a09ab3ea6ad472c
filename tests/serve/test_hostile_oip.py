"""Hostile OIP requests (issue 19, items 7 and 13): what a request echoes back is bounded and
checked, and what it asks the server to do (outputs to encode, inputs, shapes, parameters, BYTES
elements) is counted and refused with a 400 naming the field before the work, not after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import XOR, serve_in_thread
from tests.serve.test_codecs import TEXT, bad, binary_request, bytes_blob
from tests.serve.test_server_models import call
from webtorch import config as wt_config
from webtorch.serve.model import TensorSpec
from webtorch.serve.wire.oip_json import MAX_ID, MAX_PARAMETERS, OIPForm, decode_oip
from webtorch.serve.wire.short import ShortForm

JSON = b"application/json"
OCTET = b"application/octet-stream"
X = {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0, 1]}
# A model with two outputs, so that requested outputs have something to choose from.
FORM = OIPForm(
    [TensorSpec("x", "FP32", (-1, 2))],
    [TensorSpec("y", "FP32", (-1, 1)), TensorSpec("z", "FP32", (-1, 1))],
    "m",
    "1",
    max_rows=256,
)


def decode(doc: dict[str, Any]) -> Any:
    return FORM.decode(orjson.dumps(doc), JSON, None)


def short(message: str) -> str:
    assert len(message) < 400, f"an error echoing {len(message)} characters"
    return message


# -- item 7: the id ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "req_id", [{"a": 1}, 3, 2.5, True, ["a"], {"k": "x" * 100_000}, "x" * (MAX_ID + 1)]
)
@pytest.mark.parametrize("extra", [{}, {"outputs": [{"name": "y"}]}])  # fast path, general
def test_the_id_must_be_a_short_string(req_id: Any, extra: dict[str, Any]) -> None:
    short(bad(lambda: decode({"id": req_id, "inputs": [X], **extra}), match='"id" must be'))


def test_a_string_id_is_echoed() -> None:
    assert decode({"id": "req-1", "inputs": [X]}).id == "req-1"
    assert decode({"id": "i" * MAX_ID, "inputs": [X], "outputs": [{"name": "y"}]}).id == "i" * 256


# -- item 13: counts before work ---------------------------------------------------------------


def test_an_output_requested_many_times_is_refused_at_the_count() -> None:
    doc = {"inputs": [X], "outputs": [{"name": "y"}] * 100_000}
    short(bad(lambda: decode(doc), match="\"outputs\" requests 100000 outputs; model 'm' has 2"))


def test_an_output_requested_twice_is_refused() -> None:
    doc = {"inputs": [X], "outputs": [{"name": "y"}, {"name": "y"}]}
    bad(lambda: decode(doc), match="output 'y' is requested twice")


def test_an_unknown_output_name_is_not_echoed_whole() -> None:
    doc = {"inputs": [X], "outputs": [{"name": "n" * 1_000_000}]}
    short(bad(lambda: decode(doc), match="unknown output 'nnnn"))


def test_more_inputs_than_the_model_has_are_refused_at_the_count() -> None:
    doc = {"inputs": [{"name": f"i{k}"} for k in range(10_000)]}
    short(bad(lambda: decode(doc), match="\"inputs\" lists 10000 tensors; model 'm' has 1"))


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ([1] * 1_000_000, "shape of 1000000 entries does not match the model's [-1, 2]"),
        (["s" * 100_000] * 3, "shape of 3 entries does not match"),
        ([2**40, 2**40], "shape [1099511627776, 1099511627776] does not match"),
        ([2**40, 2], "has 1099511627776 rows; the model takes at most 256"),
    ],
)
def test_shapes_are_refused_before_their_data(shape: list[Any], match: str) -> None:
    doc = {"inputs": [{**X, "shape": shape}]}
    short(bad(lambda: decode(doc), match=match))


def test_rows_beyond_max_batch_are_refused_from_the_shape_of_binary_data() -> None:
    entry = {"name": "x", "datatype": "FP32", "shape": [1000, 2]}
    doc = {"inputs": [{**entry, "parameters": {"binary_data_size": 8000}}]}
    body, length = binary_request(doc, b"\x00" * 8000)
    bad(lambda: FORM.decode(body, OCTET, length), match="1000 rows; the model takes at most 256")


many = {f"p{k}": k for k in range(MAX_PARAMETERS + 1)}


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ({"inputs": [X], "parameters": many}, "request"),
        ({"inputs": [{**X, "parameters": many}]}, "input 'x'"),
        ({"inputs": [X], "outputs": [{"name": "y", "parameters": many}]}, "output 'y'"),
    ],
)
def test_parameters_objects_are_bounded(doc: dict[str, Any], where: str) -> None:
    match = f"{where}: parameters has {MAX_PARAMETERS + 1} entries; at most {MAX_PARAMETERS}"
    bad(lambda: decode(doc), match=match)


def test_deep_json_nesting_is_a_400() -> None:
    body = b'{"inputs": [{"name": "x", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"
    bad(lambda: FORM.decode(body, JSON, None), match="not valid JSON")


@pytest.mark.parametrize("size", [True, "8", 8.0, -8, None])
def test_binary_data_size_must_be_a_count(size: Any) -> None:
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2]}]}
    doc["inputs"][0]["parameters"] = {"binary_data_size": size}
    body, length = binary_request(doc, b"\x00" * 8)
    match = "neither data nor" if size is None else "binary_data_size must be a non-negative"
    bad(lambda: FORM.decode(body, OCTET, length), match=match)


def test_bytes_elements_are_counted_against_the_shape_before_splitting() -> None:
    # 16 MB of empty BYTES elements (4M) for a shape of one: refused at the second element,
    # not after splitting them all.
    blob = b"\x00\x00\x00\x00" * 4_000_000
    doc = {"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1, 1]}]}
    doc["inputs"][0]["parameters"] = {"binary_data_size": len(blob)}
    body, length = binary_request(doc, blob)
    bad(
        lambda: decode_oip(body, OCTET, length, TEXT, "m"),
        match="more BYTES elements than its shape holds (1)",
    )
    # And a shape the data cannot hold is refused before any splitting.
    doc["inputs"][0]["shape"] = [2**40, 1]
    doc["inputs"][0]["parameters"] = {"binary_data_size": 8}
    body, length = binary_request(doc, bytes_blob([b"ab", b""])[:8])
    bad(lambda: decode_oip(body, OCTET, length, TEXT, "m"), match="cannot hold the 1099511627776")


# -- over HTTP ---------------------------------------------------------------------------------


def test_over_http_amplification_and_ids_get_small_400s(tmp_path: Path) -> None:
    data = {
        "models": {
            "xor": {
                "path": str(XOR),
                "train": {"enabled": True, "state_dir": str(tmp_path / "state")},
            }
        }
    }
    with serve_in_thread(wt_config.from_dict(data)) as running:
        infer = "/v2/models/xor/infer"
        ok = call(running, "POST", infer, {"id": "a", "inputs": [X]})
        assert ok.status == 200 and ok.json()["id"] == "a"
        amplified = call(
            running, "POST", infer, {"inputs": [X], "outputs": [{"name": "y"}] * 50_000}
        )
        assert amplified.status == 400 and b'\\"outputs\\" requests 50000' in amplified.body
        assert len(amplified.body) < 400
        for path, doc in [
            (infer, {"id": {"a": 1}, "inputs": [X]}),
            (
                "/v2/models/xor/train",
                {
                    "id": {"a": 1},
                    "inputs": [X],
                    "targets": [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [1]}],
                },
            ),
        ]:
            reply = call(running, "POST", path, doc)
            assert reply.status == 400 and '"id" must be a string' in reply.json()["error"], reply
        assert call(running, "GET", "/models/xor/train").json()["step"] == 0  # nothing trained


def test_short_form_rows_beyond_max_batch_are_refused_before_conversion() -> None:
    """The short form's sibling of the OIP shape check: a list of more rows than max_batch
    that the fast path does not take is refused at its length, before its numbers are
    converted (a body's worth of them held the loop for a second); right-width rows go on to
    the batch's own max_batch check, as before."""
    form = ShortForm([TensorSpec("x", "FP32", (-1, 2))], [TensorSpec("y", "FP32", (-1, 1))], "m", 4)
    for data in ([[0, 1, 2]] * 5, [[0]] * 5, {"x": [[0, 1, 2]] * 5}):
        body = orjson.dumps({"inputs": data})
        bad(lambda b=body: form.decode(b, JSON), match="5 rows; the model takes at most 4")
    assert form.decode(orjson.dumps({"inputs": [[0, 1]] * 5}), JSON)[1] == 5
