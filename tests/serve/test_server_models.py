"""Model serving end to end: a real server on port 0, real sockets, real models written to disk."""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import XOR, Running, serve_in_thread
from webtorch import config as wt_config

# -- model files -----------------------------------------------------------------------------------

TWO_PY = """
import torch
from torch import nn
import webtorch


class Two(nn.Module):
    def forward(self, a, b):
        return a.sum(dim=1, keepdim=True) + b.unsqueeze(1).float(), -b


model = webtorch.Model(
    network=Two(),
    inputs=[webtorch.TensorSpec("a", "FP32", (-1, 2)), webtorch.TensorSpec("b", "INT64", (-1,))],
    outputs=[
        webtorch.TensorSpec("sum", "FP32", (-1, 1)),
        webtorch.TensorSpec("neg", "INT64", (-1,)),
    ],
    version="2",
)
"""

# BYTES in, INT64 out: preprocess turns the strings into a tensor of their lengths.
TEXT_PY = """
import torch
from torch import nn
import webtorch


def lengths(inputs):
    text = inputs["text"]
    return {"text": torch.tensor([len(s) for s in text.ravel()], dtype=torch.int64)}


model = webtorch.Model(
    network=nn.Identity(),
    inputs=[webtorch.TensorSpec("text", "BYTES", (-1,))],
    outputs=[webtorch.TensorSpec("length", "INT64", (-1,))],
    preprocess=lengths,
)
"""

# Raises on any negative input: one bad request must not fail the batch it was merged into.
FRAGILE_PY = """
import torch
from torch import nn
import webtorch


class Fragile(nn.Module):
    def forward(self, x):
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return x * 2


model = webtorch.Model(
    network=Fragile(),
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 1))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 1))],
)
"""

MODEL_FILES = {"two.py": TWO_PY, "text.py": TEXT_PY, "fragile.py": FRAGILE_PY}


def write_models(directory: Path) -> Path:
    for name, source in MODEL_FILES.items():
        (directory / name).write_text(source)
    return directory


def models_config(directory: Path, **xor: Any) -> wt_config.Config:
    """XOR (with ``xor`` overrides) plus the models above, and a few config routes."""
    data: dict[str, Any] = {
        "models": {
            "xor": {"path": str(XOR), **xor},
            "two": {"path": "two.py", "max_batch": 4},
            "text": {"path": "text.py"},
            "fragile": {"path": "fragile.py"},
            "delayed": {"path": str(XOR), "max_delay": 0.002},
            "tiny": {"path": str(XOR), "max_queue": 2, "max_batch": 2},
        },
        "routes": [
            {"path": "/healthz", "return": 200, "body": "ok\n"},
            {"path": "/teapot", "return": 418, "body": "short and stout", "content_type": "text/x"},
            {"path": "/xor", "model": "xor"},
            {"prefix": "/api/two/", "model": "two"},
        ],
    }
    return wt_config.from_dict(data, "test.toml", write_models(directory))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with serve_in_thread(models_config(tmp_path_factory.mktemp("models"))) as running:
        yield running


# -- a small HTTP client ---------------------------------------------------------------------------


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self.headers
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:200]!r})"


def call(
    running: Running,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | list[Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    if isinstance(body, dict | list):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    conn = http.client.HTTPConnection(running.host, running.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def predict(running: Running, model: str, inputs: Any) -> Reply:
    return call(running, "POST", f"/models/{model}/predict", {"inputs": inputs})


def raw_request(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def read_reply(sock: socket.socket, close: bool = True) -> Reply:
    """One response from ``sock`` (Content-Length framed); with ``close``, to EOF and closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    if close:
        while sock.recv(65536):
            pass
        sock.close()
    return Reply(int(lines[0].split()[1]), headers, body[:length])


@contextmanager
def loop_paused(running: Running) -> Iterator[None]:
    """Block the server's event loop: requests sent meanwhile wait in the kernel, and when the
    loop resumes it reads them all in one go, so they reach the batcher together."""
    entered = threading.Event()
    release = threading.Event()

    def block() -> None:
        entered.set()
        release.wait(30)

    running.loop.call_soon_threadsafe(block)
    assert entered.wait(30)
    try:
        yield
    finally:
        release.set()


def send_together(running: Running, requests: list[bytes]) -> list[Reply]:
    """Send every request on its own connection while the loop is paused; replies in order.

    Each connection first completes a keep-alive round trip, so the server is already reading
    from all of them: when the loop resumes, one poll finds every request readable."""
    socks = []
    for _ in requests:
        sock = socket.create_connection((running.host, running.port), timeout=30)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_reply(sock, close=False).status == 200
        socks.append(sock)
    with loop_paused(running):
        for sock, raw in zip(socks, requests, strict=True):
            sock.sendall(raw)
    return [read_reply(sock) for sock in socks]


def metrics(running: Running) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    reply = call(running, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def xor_of(rows: list[list[int]]) -> list[int]:
    return [a ^ b for a, b in rows]


def assert_xor(outputs: list[list[float]], rows: list[list[int]]) -> None:
    assert len(outputs) == len(rows)
    for (p,), want in zip(outputs, xor_of(rows), strict=True):
        assert (p > 0.9) if want else (p < 0.1), (outputs, rows)


# -- Open Inference Protocol routes --------------------------------------------------------------


def test_server_metadata_and_health(server: Running) -> None:
    reply = call(server, "GET", "/v2")
    assert reply.status == 200
    doc = reply.json()
    assert doc["name"] == "webtorch" and isinstance(doc["version"], str)
    assert "binary_tensor_data" in doc["extensions"]
    assert call(server, "GET", "/v2/health/live").json() == {"live": True}
    assert call(server, "GET", "/v2/health/ready").json() == {"ready": True}
    head = call(server, "HEAD", "/v2/health/live")
    assert head.status == 200 and head.body == b""


def test_model_metadata_and_ready(server: Running) -> None:
    doc = call(server, "GET", "/v2/models/xor").json()
    assert doc == {
        "name": "xor",
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
    }
    assert call(server, "GET", "/v2/models/xor/ready").json() == {"name": "xor", "ready": True}
    two = call(server, "GET", "/v2/models/two").json()
    assert two["versions"] == ["2"]
    assert [t["name"] for t in two["inputs"]] == ["a", "b"]
    assert [t["datatype"] for t in two["outputs"]] == ["FP32", "INT64"]
    assert call(server, "GET", "/models/two").json() == two  # the short form's metadata


def test_versions_path(server: Running) -> None:
    assert call(server, "GET", "/v2/models/two/versions/2").json()["name"] == "two"
    assert call(server, "GET", "/v2/models/two/versions/2/ready").json()["ready"] is True
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 0]}]}
    reply = call(server, "POST", "/v2/models/xor/versions/1/infer", body)
    assert reply.status == 200 and reply.json()["outputs"][0]["data"][0] > 0.9
    missing = call(server, "GET", "/v2/models/two/versions/7")
    assert missing.status == 404
    assert "no version '7'" in missing.json()["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/nope"),
        ("GET", "/v2/models/nope/ready"),
        ("POST", "/v2/models/nope/infer"),
        ("POST", "/models/nope/predict"),
        ("GET", "/models/nope"),
    ],
)
def test_unknown_model_is_404_json(server: Running, method: str, path: str) -> None:
    reply = call(server, method, path, b"{}" if method == "POST" else None)
    assert reply.status == 404
    error = reply.json()["error"]
    assert "unknown model 'nope'" in error and "xor" in error  # names what is served


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v2/models/xor", "GET"),
        ("POST", "/v2", "GET"),
        ("POST", "/v2/health/live", "GET"),
        ("DELETE", "/v2/models/xor/ready", "GET"),
        ("GET", "/v2/models/xor/infer", "POST"),
        ("GET", "/models/xor/predict", "POST"),
        ("POST", "/models/xor", "GET"),
        ("GET", "/xor", "POST"),
    ],
)
def test_wrong_method_is_405_with_allow(
    server: Running, method: str, path: str, allow: str
) -> None:
    reply = call(server, method, path, b"{}" if method in ("POST", "PUT") else None)
    assert reply.status == 405
    assert reply.headers["allow"] == allow
    assert method in reply.json()["error"]


@pytest.mark.parametrize(
    "path", ["/nope", "/v2/nope", "/v2/models", "/models/xor/train/x", "/api/"]
)
def test_unknown_route_is_404_json(server: Running, path: str) -> None:
    reply = call(server, "GET", path)
    assert reply.status == 404
    assert path in reply.json()["error"] or "no" in reply.json()["error"]


# -- predictions ----------------------------------------------------------------------------------


def test_short_form_xor(server: Running) -> None:
    rows = [[0, 0], [0, 1], [1, 0], [1, 1]]
    reply = predict(server, "xor", rows)
    assert reply.status == 200
    assert_xor(reply.json()["outputs"], rows)
    single = predict(server, "xor", [[1, 0]])
    assert single.json()["outputs"][0][0] > 0.9


def test_oip_json_infer_xor(server: Running) -> None:
    body = {
        "id": "q1",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [4, 2], "data": [0, 0, 0, 1, 1, 0, 1, 1]}
        ],
    }
    doc = call(server, "POST", "/v2/models/xor/infer", body).json()
    assert doc["id"] == "q1" and doc["model_name"] == "xor" and doc["model_version"] == "1"
    (out,) = doc["outputs"]
    assert out["name"] == "y" and out["datatype"] == "FP32" and out["shape"] == [4, 1]
    assert_xor([[v] for v in out["data"]], [[0, 0], [0, 1], [1, 0], [1, 1]])


def test_oip_binary_infer_two_inputs_two_outputs(server: Running) -> None:
    a = np.array([[1, 2], [3, 4]], dtype="<f4")
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "a",
                    "datatype": "FP32",
                    "shape": [2, 2],
                    "parameters": {"binary_data_size": 16},
                },
                {"name": "b", "datatype": "INT64", "shape": [2], "data": [10, -20]},
            ],
            "outputs": [{"name": "neg", "parameters": {"binary_data": True}}, {"name": "sum"}],
        }
    ).encode()
    reply = call(
        server,
        "POST",
        "/v2/models/two/infer",
        header + a.tobytes(),
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    assert reply.status == 200, reply
    assert reply.headers["content-type"] == "application/octet-stream"
    length = int(reply.headers["inference-header-content-length"])
    doc = json.loads(reply.body[:length])
    neg, total = doc["outputs"]
    assert neg["name"] == "neg" and neg["parameters"]["binary_data_size"] == 16
    assert np.frombuffer(reply.body[length:], "<i8").tolist() == [-10, 20]
    assert total == {"name": "sum", "datatype": "FP32", "shape": [2, 1], "data": [13.0, -13.0]}


def test_short_form_two_inputs_two_outputs(server: Running) -> None:
    reply = predict(server, "two", {"a": [[1, 1], [0, 0.5]], "b": [1, 2]})
    assert reply.json() == {"outputs": {"sum": [[3.0], [2.5]], "neg": [-1, -2]}}


def test_bytes_input_through_preprocess(server: Running) -> None:
    assert predict(server, "text", ["", "a", "héllo"]).json() == {"outputs": [0, 1, 6]}
    items = [b"abc", b"\x00\xff", b""]
    blob = b"".join(len(i).to_bytes(4, "little") + i for i in items)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [3],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
        }
    ).encode()
    reply = call(
        server,
        "POST",
        "/v2/models/text/infer",
        header + blob,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert reply.json()["outputs"][0]["data"] == [3, 2, 0]


def test_fixed_return_routes(server: Running) -> None:
    reply = call(server, "GET", "/healthz")
    assert (reply.status, reply.body, reply.headers["content-type"]) == (200, b"ok\n", "text/plain")
    again = call(server, "POST", "/healthz", b"ignored")
    assert (again.status, again.body) == (200, b"ok\n")
    teapot = call(server, "GET", "/teapot")
    assert (teapot.status, teapot.body, teapot.headers["content-type"]) == (
        418,
        b"short and stout",
        "text/x",
    )


def test_exact_path_and_prefix_routed_to_models(server: Running) -> None:
    reply = call(server, "POST", "/xor", {"inputs": [[0, 1], [1, 1]]})
    assert_xor(reply.json()["outputs"], [[0, 1], [1, 1]])
    assert call(server, "POST", "/xor/sub", {"inputs": [[0, 1]]}).status == 404  # exact only
    reply = call(server, "POST", "/api/two/anything/here", {"inputs": {"a": [[1, 1]], "b": [1]}})
    assert reply.json()["outputs"]["neg"] == [-1]


def test_max_delay_model_answers(server: Running) -> None:
    # A lone request on a model with max_delay goes when the delay timer fires.
    assert_xor(predict(server, "delayed", [[1, 1], [0, 1]]).json()["outputs"], [[1, 1], [0, 1]])


# -- errors: 4xx JSON naming the problem, and the server keeps serving -----------------------------


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _x(**entry: Any) -> bytes:
    """An OIP request for XOR's input x, with ``entry`` overriding its fields."""
    return _json({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], **entry}]})


def _binary(header: bytes, blob: bytes) -> tuple[bytes, dict[str, str]]:
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


_SHORT_BINARY = _binary(_x(parameters={"binary_data_size": 8}), b"\x00\x00")
_EXTRA_BINARY = _binary(_x(data=[0, 1]), b"\x00\x00")
_FIVE = _json({"inputs": {"a": [[0, 1]] * 5, "b": [1] * 5}})
_NOT_JSON = {"Content-Type": "application/xml"}
_OCTET = {"Content-Type": "application/octet-stream"}

BAD_REQUESTS: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("/models/xor/predict", b"{not json", {}, 400, "not valid JSON"),
    ("/models/xor/predict", b'{"inputs": [[0, 1, 2]]}', {}, 400, "shape [1, 3]"),
    ("/models/xor/predict", b'{"inputs": [["a", "b"]]}', {}, 400, "FP32 numbers"),
    ("/models/xor/predict", b'{"inputs": [[0, 1], [1]]}', {}, 400, "ragged"),
    ("/models/xor/predict", b'{"x": [[0, 1]]}', {}, 400, '"inputs"'),
    ("/models/xor/predict", b"<xml/>", _NOT_JSON, 415, "content type"),
    ("/models/two/predict", b'{"inputs": {"a": [[0, 1]]}}', {}, 400, "needs input(s) b"),
    ("/models/two/predict", b'{"inputs": {"a": [[0, 1]], "c": [1]}}', {}, 400, "input 'c'"),
    ("/models/two/predict", b'{"inputs": [[0, 1]]}', {}, 400, "several inputs"),
    ("/models/two/predict", _FIVE, {}, 400, "at most 4 per request (max_batch)"),
    ("/models/text/predict", b'{"inputs": [1, 2]}', {}, 400, "BYTES data must be strings"),
    ("/v2/models/xor/infer", _x(name="z", data=[0, 1]), {}, 400, "unknown input 'z'"),
    ("/v2/models/xor/infer", _x(datatype="INT8", data=[0, 1]), {}, 400, "datatype INT8"),
    ("/v2/models/xor/infer", _x(datatype=[1], data=[0, 1]), {}, 400, "datatype [1]"),
    ("/v2/models/xor/infer", _x(shape=[2, 2], data=[0, 1]), {}, 400, "do not fill shape"),
    ("/v2/models/xor/infer", _x(data=[True, False]), {}, 400, "FP32 numbers"),
    ("/v2/models/xor/infer", _x(), {}, 400, "neither data nor binary_data_size"),
    ("/v2/models/xor/infer", b'{"inputs": []}', {}, 400, 'non-empty "inputs"'),
    (
        "/v2/models/xor/infer",
        _json({**json.loads(_x(data=[0, 1])), "outputs": [{"name": "w"}]}),
        {},
        400,
        "unknown output 'w'",
    ),
    ("/v2/models/xor/infer", *_SHORT_BINARY, 400, "exceeds the body"),
    ("/v2/models/xor/infer", *_EXTRA_BINARY, 400, "2 bytes of binary data are not claimed"),
    ("/v2/models/xor/infer", b"\x00" * 8, _OCTET, 400, "Inference-Header-Content-Length"),
    (
        "/v2/models/xor/infer",
        b"{}",
        {"Inference-Header-Content-Length": "x"},
        400,
        "not an integer",
    ),
    ("/models/fragile/predict", b'{"inputs": [[-1]]}', {}, 422, "negative input"),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "match"),
    BAD_REQUESTS,
    ids=[f"{i}-{case[4]}" for i, case in enumerate(BAD_REQUESTS)],
)
def test_errors_are_4xx_json_naming_the_problem(
    server: Running, path: str, body: bytes, headers: dict[str, str], status: int, match: str
) -> None:
    headers = {"Content-Type": "application/json", **headers}
    reply = call(server, "POST", path, body, headers)
    assert reply.status == status, reply
    assert match in reply.json()["error"]
    # and the server keeps serving
    assert_xor(predict(server, "xor", [[0, 1]]).json()["outputs"], [[0, 1]])


def test_one_failing_request_in_a_batch_fails_alone(server: Running) -> None:
    before = metrics(server)
    values = [[[1.0]], [[-1.0]], [[2.0], [3.0]], [[-5.0], [5.0]], [[4.0]]]
    replies = send_together(
        server,
        [
            raw_request("/models/fragile/predict", json.dumps({"inputs": v}).encode())
            for v in values
        ],
    )
    assert [r.status for r in replies] == [200, 422, 200, 422, 200]
    assert replies[0].json() == {"outputs": [[2.0]]}
    assert replies[2].json() == {"outputs": [[4.0], [6.0]]}
    assert replies[4].json() == {"outputs": [[8.0]]}
    for bad in (replies[1], replies[3]):
        assert "negative input" in bad.json()["error"] and "fragile" in bad.json()["error"]
    after = metrics(server)
    assert (
        metric(after, "webtorch_model_errors_total", model="fragile")
        - metric(before, "webtorch_model_errors_total", model="fragile")
        == 2
    )


def test_a_request_with_non_numbers_in_a_batch_gets_400_alone(server: Running) -> None:
    # Short-form rows are checked when the batch converts them: a bad one must not cost the
    # others their answer, and must get a 400 naming the problem, not a model failure.
    values: list[Any] = [[[0, 1]], [[1, "one"]], [[1, 1], [0, 0]], [[None, 0]], [[1, 0]]]
    replies = send_together(
        server,
        [raw_request("/models/xor/predict", json.dumps({"inputs": v}).encode()) for v in values],
    )
    assert [r.status for r in replies] == [200, 400, 200, 400, 200]
    assert_xor(replies[0].json()["outputs"], [[0, 1]])
    assert_xor(replies[2].json()["outputs"], [[1, 1], [0, 0]])
    assert_xor(replies[4].json()["outputs"], [[1, 0]])
    for bad in (replies[1], replies[3]):
        assert "input 'x'" in bad.json()["error"]


def test_oip_flat_data_with_non_numbers_in_a_batch_gets_400_alone(server: Running) -> None:
    def body(shape: list[int], data: list[Any]) -> bytes:
        entry = {"name": "x", "datatype": "FP32", "shape": shape, "data": data}
        return json.dumps({"inputs": [entry]}).encode()

    replies = send_together(
        server,
        [
            raw_request("/v2/models/xor/infer", body([1, 2], [0, 1])),
            raw_request("/v2/models/xor/infer", body([1, 2], [1, "x"])),
            raw_request("/v2/models/xor/infer", body([2, 2], [1, 1, 1, 0])),
            raw_request("/v2/models/xor/infer", body([2, 2], [[0, 0], [0, 1]])),  # nested is fine
        ],
    )
    assert [r.status for r in replies] == [200, 400, 200, 200]
    assert_xor([[v] for v in replies[0].json()["outputs"][0]["data"]], [[0, 1]])
    assert_xor([[v] for v in replies[2].json()["outputs"][0]["data"]], [[1, 1], [1, 0]])
    assert_xor([[v] for v in replies[3].json()["outputs"][0]["data"]], [[0, 0], [0, 1]])
    assert "input 'x'" in replies[1].json()["error"]


def test_queue_full_sheds_load_with_503(server: Running) -> None:
    # "tiny" queues at most 2 rows: the third request that arrives together is refused.
    body = json.dumps({"inputs": [[1, 0]]}).encode()
    replies = send_together(server, [raw_request("/models/tiny/predict", body)] * 3)
    assert sorted(r.status for r in replies) == [200, 200, 503]
    refused = next(r for r in replies if r.status == 503)
    assert "queue is full" in refused.json()["error"]
    assert predict(server, "tiny", [[1, 0]]).status == 200


# -- concurrency and dynamic batching ----------------------------------------------------------


def random_rows(rng: random.Random) -> list[list[int]]:
    return [[rng.randint(0, 1), rng.randint(0, 1)] for _ in range(rng.randint(1, 4))]


def test_concurrent_requests_are_batched_and_answered_correctly(server: Running) -> None:
    rng = random.Random(7)
    payloads = [random_rows(rng) for _ in range(64)]
    before = metrics(server)
    replies = send_together(
        server,
        [raw_request("/models/xor/predict", json.dumps({"inputs": p}).encode()) for p in payloads],
    )
    for reply, rows in zip(replies, payloads, strict=True):
        assert reply.status == 200, reply
        assert_xor(reply.json()["outputs"], rows)
    after = metrics(server)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    batches = delta("webtorch_model_batches_total", model="xor")
    requests = delta(
        "webtorch_http_requests_total", route="/models/xor/predict", method="POST", status="200"
    )
    assert requests == 64
    assert 1 <= batches < requests  # dynamic batching happened
    assert delta("webtorch_model_batch_rows_count", model="xor") == batches
    assert delta("webtorch_model_batch_rows_sum", model="xor") == sum(len(p) for p in payloads)
    assert delta("webtorch_model_stage_seconds_count", model="xor", stage="queue") == 64
    assert delta("webtorch_model_stage_seconds_count", model="xor", stage="network") == batches


def test_many_threads_get_their_own_answers(server: Running) -> None:
    rng = random.Random(11)
    payloads = [random_rows(rng) for _ in range(64)]

    def one(rows: list[list[int]]) -> tuple[list[list[int]], Reply]:
        return rows, predict(server, "xor", rows)

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, payloads))
    for rows, reply in results:
        assert reply.status == 200, reply
        assert_xor(reply.json()["outputs"], rows)


def test_concurrent_oip_requests_with_different_models(server: Running) -> None:
    requests: list[bytes] = []
    expected: list[Any] = []
    for i in range(24):
        if i % 3 == 0:
            requests.append(
                raw_request(
                    "/models/two/predict",
                    json.dumps({"inputs": {"a": [[i, 1]], "b": [i]}}).encode(),
                )
            )
            expected.append({"outputs": {"sum": [[2.0 * i + 1]], "neg": [-i]}})
        elif i % 3 == 1:
            requests.append(
                raw_request("/models/text/predict", json.dumps({"inputs": ["x" * i]}).encode())
            )
            expected.append({"outputs": [i]})
        else:
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [i]}]}
            requests.append(raw_request("/v2/models/fragile/infer", json.dumps(body).encode()))
            expected.append(2.0 * i)
    replies = send_together(server, requests)
    for reply, want in zip(replies, expected, strict=True):
        assert reply.status == 200, reply
        if isinstance(want, float):
            assert reply.json()["outputs"][0]["data"] == [want]
        else:
            assert reply.json() == want


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_expose_requests_latency_batches_and_stages(server: Running) -> None:
    assert predict(server, "xor", [[0, 1]]).status == 200
    assert predict(server, "xor", [[0, 1, 1]]).status == 400
    assert call(server, "GET", "/v2/models/xor").status == 200
    assert call(server, "GET", "/definitely/not/here").status == 404
    samples = metrics(server)
    requests = "webtorch_http_requests_total"
    assert metric(samples, requests, route="/models/xor/predict", method="POST", status="200") >= 1
    assert metric(samples, requests, route="/models/xor/predict", method="POST", status="400") >= 1
    assert metric(samples, requests, route="/v2/models/xor", method="GET", status="200") >= 1
    assert metric(samples, requests, route="unmatched", method="GET", status="404") >= 1
    latency = "webtorch_http_request_duration_seconds"
    count = metric(samples, latency + "_count", route="/models/xor/predict")
    assert count >= 2
    assert metric(samples, latency + "_bucket", route="/models/xor/predict", le="+Inf") == count
    assert metric(samples, "webtorch_model_batches_total", model="xor") >= 1
    rows = metric(samples, "webtorch_model_batch_rows_count", model="xor")
    assert (
        rows >= 1
        and metric(samples, "webtorch_model_batch_rows_bucket", model="xor", le="+Inf") == rows
    )
    assert metric(samples, "webtorch_model_batch_rows_bucket", model="xor", le="1.0") >= 1
    for stage in ("decode", "queue", "preprocess", "network", "postprocess", "encode"):
        assert (
            metric(samples, "webtorch_model_stage_seconds_count", model="xor", stage=stage) >= 1
        ), stage
        assert metric(samples, "webtorch_model_stage_seconds_sum", model="xor", stage=stage) >= 0
    # Nothing any test here sent was answered with a 5xx, except the deliberate 503 shedding.
    for (name, labels), value in samples.items():
        if name == requests and value:
            status = dict(labels)["status"]
            assert not status.startswith("5") or (
                status == "503" and dict(labels)["route"] == "/models/tiny/predict"
            ), labels


# -- compute = "thread" ----------------------------------------------------------------------------


def test_thread_compute_mode_serves_and_batches(tmp_path: Path) -> None:
    with serve_in_thread(models_config(tmp_path, compute="thread")) as running:
        assert running.app.executors["xor"].mode == "thread"
        rows = [[0, 0], [0, 1], [1, 0], [1, 1]]
        assert_xor(predict(running, "xor", rows).json()["outputs"], rows)
        rng = random.Random(3)
        payloads = [random_rows(rng) for _ in range(32)]
        replies = send_together(
            running,
            [
                raw_request("/models/xor/predict", json.dumps({"inputs": p}).encode())
                for p in payloads
            ],
        )
        for reply, p in zip(replies, payloads, strict=True):
            assert reply.status == 200, reply
            assert_xor(reply.json()["outputs"], p)
        samples = metrics(running)
        assert 1 <= metric(samples, "webtorch_model_batches_total", model="xor") < 33
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 1]}]}
        assert (
            call(running, "POST", "/v2/models/xor/infer", body).json()["outputs"][0]["data"][0]
            < 0.1
        )
        assert predict(running, "xor", [[0, 1, 1]]).status == 400
