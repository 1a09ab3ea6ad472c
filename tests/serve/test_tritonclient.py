"""Triton's own HTTP client (a client nobody here wrote) against a real WebTorch server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.http import InferenceServerClient
from tritonclient.utils import InferenceServerException

from tests.conftest import Running, serve_in_thread
from tests.serve.test_server_models import models_config

XOR_IN = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
XOR_OUT = [0, 1, 1, 0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with serve_in_thread(models_config(tmp_path_factory.mktemp("triton"))) as running:
        yield running


@pytest.fixture
def client(server: Running) -> Iterator[InferenceServerClient]:
    c = InferenceServerClient(f"{server.host}:{server.port}", connection_timeout=30)
    yield c
    c.close()


def assert_xor(y: np.ndarray) -> None:
    assert y.shape == (4, 1) and y.dtype == np.float32
    for p, want in zip(y[:, 0], XOR_OUT, strict=True):
        assert (p > 0.9) if want else (p < 0.1), y


def test_server_live_ready_and_metadata(client: InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "webtorch"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_ready_and_metadata(client: InferenceServerClient) -> None:
    assert client.is_model_ready("xor")
    assert client.is_model_ready("xor", model_version="1")
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("xor")
    assert meta["name"] == "xor" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]
    assert client.get_model_metadata("two", model_version="2")["versions"] == ["2"]


def test_infer_json_tensors(client: InferenceServerClient) -> None:
    x = httpclient.InferInput("x", [4, 2], "FP32")
    x.set_data_from_numpy(XOR_IN, binary_data=False)
    out = httpclient.InferRequestedOutput("y", binary_data=False)
    result = client.infer("xor", [x], outputs=[out], request_id="r-1")
    assert_xor(result.as_numpy("y"))
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_name"] == "xor"
    assert "data" in response["outputs"][0]  # sent back as JSON


def test_infer_binary_tensors(client: InferenceServerClient) -> None:
    x = httpclient.InferInput("x", [4, 2], "FP32")
    x.set_data_from_numpy(XOR_IN, binary_data=True)
    out = httpclient.InferRequestedOutput("y", binary_data=True)
    result = client.infer("xor", [x], outputs=[out])
    assert_xor(result.as_numpy("y"))
    (entry,) = result.get_response()["outputs"]
    assert entry["parameters"]["binary_data_size"] == 16


def test_infer_without_requested_outputs(client: InferenceServerClient) -> None:
    x = httpclient.InferInput("x", [4, 2], "FP32")
    x.set_data_from_numpy(XOR_IN)  # binary by default in tritonclient
    assert_xor(client.infer("xor", [x]).as_numpy("y"))


def test_two_inputs_two_outputs_mixed(client: InferenceServerClient) -> None:
    a = httpclient.InferInput("a", [3, 2], "FP32")
    a.set_data_from_numpy(
        np.array([[1, 2], [3, 4], [0.5, 0.25]], dtype=np.float32), binary_data=True
    )
    b = httpclient.InferInput("b", [3], "INT64")
    b.set_data_from_numpy(np.array([1, -2, 2**40], dtype=np.int64), binary_data=False)
    outputs = [
        httpclient.InferRequestedOutput("sum", binary_data=False),
        httpclient.InferRequestedOutput("neg", binary_data=True),
    ]
    result = client.infer("two", [a, b], outputs=outputs, model_version="2")
    np.testing.assert_allclose(result.as_numpy("sum"), [[4.0], [5.0], [0.75 + 2**40]])
    assert result.as_numpy("neg").tolist() == [-1, 2, -(2**40)]


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_input(client: InferenceServerClient, binary: bool) -> None:
    text = httpclient.InferInput("text", [3], "BYTES")
    text.set_data_from_numpy(
        np.array([b"abc", b"", "héllo".encode()], dtype=object), binary_data=binary
    )
    result = client.infer("text", [text])
    assert result.as_numpy("length").tolist() == [3, 0, 6]


def test_wrong_shape_is_an_exception_with_our_message(
    client: InferenceServerClient,
) -> None:
    x = httpclient.InferInput("x", [2, 3], "FP32")
    x.set_data_from_numpy(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("xor", [x])
    assert "shape [2, 3] does not match the model's [-1, 2]" in info.value.message()
    assert info.value.status() == "400"


def test_wrong_datatype_and_unknown_model(client: InferenceServerClient) -> None:
    x = httpclient.InferInput("x", [1, 2], "FP64")
    x.set_data_from_numpy(np.zeros((1, 2), dtype=np.float64))
    with pytest.raises(InferenceServerException, match="datatype FP64"):
        client.infer("xor", [x])
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")
    # the server keeps serving
    ok = httpclient.InferInput("x", [4, 2], "FP32")
    ok.set_data_from_numpy(XOR_IN)
    assert_xor(client.infer("xor", [ok]).as_numpy("y"))


def test_model_repository_with_the_json_content_type(tmp_path: Path) -> None:
    """tritonclient sends load/unload without a Content-Type, which a web page could send too
    (CSRF): WebTorch refuses it, and the client's ``headers`` argument is the way."""
    from tests.serve.test_repository import repo_config

    with serve_in_thread(repo_config(tmp_path)) as running:
        c = InferenceServerClient(f"{running.host}:{running.port}", connection_timeout=30)
        try:
            with pytest.raises(InferenceServerException, match="Content-Type: application/json"):
                c.load_model("scale")
            json_type = {"Content-Type": "application/json"}
            c.load_model("scale", headers=json_type)
            assert c.is_model_ready("scale")
            c.unload_model("scale", headers=json_type)
            assert not c.is_model_ready("scale")
        finally:
            c.close()
