"""Training over HTTP end to end: a real server on port 0, real sockets, real torch steps."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import XOR, Running, serve_in_thread
from tests.serve.test_server_models import (
    Reply,
    call,
    metric,
    metrics,
    predict,
    raw_request,
    send_together,
)
from webtorch import config as wt_config
from webtorch.app import App
from webtorch.errors import ConfigError, ModelLoadError

TOKEN = "s3cret-token-0123456789"

# Trainable, and raises on a negative input: a bad example must fail alone.
FRAGILE_PY = """
import torch
from torch import nn
import webtorch


class Fragile(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return x * self.scale


model = webtorch.Model(
    network=Fragile,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 1))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 1))],
    loss=lambda out, tgt: ((out["y"] - tgt["y"]) ** 2).mean(),
    optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
)
"""


def train_config(tmp_path: Path, server: dict[str, Any] | None = None, **train: Any) -> Any:
    (tmp_path / "fragile.py").write_text(FRAGILE_PY)
    settings = {"enabled": True, "state_dir": str(tmp_path / "state"), **train}
    data: dict[str, Any] = {
        "models": {
            "xor": {"path": str(XOR), "train": settings},
            "fragile": {
                "path": str(tmp_path / "fragile.py"),
                "train": {**settings, "state_dir": str(tmp_path / "fragile-state")},
            },
            "frozen": {"path": str(XOR)},
        }
    }
    if server:
        data["server"] = server
    return wt_config.from_dict(data)


@pytest.fixture
def trainer(tmp_path: Path) -> Iterator[Running]:
    with serve_in_thread(train_config(tmp_path)) as running:
        yield running


def train(running: Running, body: Any, model: str = "xor", **headers: str) -> Reply:
    return call(running, "POST", f"/models/{model}/train", body, headers)


def test_short_form_answers_loss_and_step(trainer: Running) -> None:
    first = train(trainer, {"inputs": [[0, 1]], "targets": [[1]]})
    assert first.status == 200, first
    assert set(first.json()) == {"loss", "step"}
    assert first.json()["step"] == 1 and first.json()["loss"] > 0
    second = train(trainer, {"inputs": [[1, 1], [0, 0]], "targets": [[0], [0]]})
    assert second.json()["step"] == 2
    status = call(trainer, "GET", "/models/xor/train").json()
    assert status["step"] == 2 and status["examples"] == 3 and status["durability"] == "wal"


def test_training_changes_what_predict_answers(trainer: Running) -> None:
    before = predict(trainer, "xor", [[0, 1]]).json()["outputs"][0][0]
    for _ in range(20):
        assert train(trainer, {"inputs": [[0, 1]], "targets": [[0]]}).status == 200
    after = predict(trainer, "xor", [[0, 1]]).json()["outputs"][0][0]
    assert after < before - 0.1


def test_oip_train_json_and_binary(trainer: Running) -> None:
    doc = {
        "id": "r1",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [0, 1, 1, 0]}],
        "targets": [{"name": "y", "datatype": "FP32", "shape": [2, 1], "data": [1, 1]}],
    }
    reply = call(trainer, "POST", "/v2/models/xor/train", doc)
    assert reply.status == 200, reply
    body = reply.json()
    assert body["model_name"] == "xor" and body["id"] == "r1" and body["step"] == 1
    assert isinstance(body["loss"], float)

    x = np.array([[1, 1]], dtype="<f4").tobytes()
    y = np.array([[0]], dtype="<f4").tobytes()
    header = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"parameters":'
    header += b'{"binary_data_size":%d}}],"targets":[{"name":"y","datatype":"FP32",' % len(x)
    header += b'"shape":[1,1],"parameters":{"binary_data_size":%d}}]}' % len(y)
    reply = call(
        trainer,
        "POST",
        "/v2/models/xor/train",
        header + x + y,
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    assert reply.status == 200, reply
    assert reply.json()["step"] == 2
    assert "train" in call(trainer, "GET", "/v2").json()["extensions"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": [[0, 1]]}, '"inputs" and "targets"'),
        ({"inputs": [[0, 1]], "targets": [[1, 2]]}, "target 'y': shape [1, 2]"),
        ({"inputs": [[0, 1]], "targets": [["one"]]}, "target 'y': data must be FP32"),
        ({"inputs": [[0, 1], [1, 1]], "targets": [[1]]}, "2 rows of inputs but 1 rows"),
        ({"inputs": [[0, 1, 2]], "targets": [[1]]}, "input 'x': shape [1, 3]"),
        ({"inputs": [[0, 1]], "targets": {"z": [[1]]}}, "unknown target 'z'"),
    ],
)
def test_bad_train_requests_get_400_naming_the_problem(
    trainer: Running, body: Any, message: str
) -> None:
    reply = train(trainer, body)
    assert reply.status == 400, reply
    assert message in reply.json()["error"]
    assert call(trainer, "GET", "/models/xor/train").json()["step"] == 0


def test_oip_binary_target_size_mismatch_is_400(trainer: Running) -> None:
    x = struct.pack("<2f", 0, 1)
    header = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"parameters":'
    header += b'{"binary_data_size":8}}],"targets":[{"name":"y","datatype":"FP32",'
    header += b'"shape":[1,1],"parameters":{"binary_data_size":8}}]}'
    reply = call(
        trainer,
        "POST",
        "/v2/models/xor/train",
        header + x + x,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert reply.status == 400 and "target 'y'" in reply.json()["error"]


@pytest.mark.parametrize("where", ["inputs", "targets"])
def test_oip_train_rows_beyond_max_batch_are_refused_from_the_shape(
    trainer: Running, where: str
) -> None:
    """Issue 19's sibling of item 13: a train tensor's shape claiming more rows than
    train.max_batch (64 here) is refused before its data is decoded, as inference's is. The data
    is no array at all: decoding it first would have named that instead."""
    doc: dict[str, Any] = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0, 1]}],
        "targets": [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [1]}],
    }
    doc[where][0].update(shape=[100_000, 2 if where == "inputs" else 1], data="not decoded")
    reply = call(trainer, "POST", "/v2/models/xor/train", doc)
    assert reply.status == 400, reply
    assert "100000 rows; the model takes at most 64 per request" in reply.json()["error"]
    assert call(trainer, "GET", "/models/xor/train").json()["step"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [[0, 1, 2]] * 100, "targets": [[1]] * 100},  # the general decoder
        {"inputs": [[0, 1]] * 100, "targets": [[1, 2]] * 100},  # the fast path's fallback
        {"inputs": {"x": [[0, 1, 2]] * 100}, "targets": {"y": [[1]] * 100}},
    ],
)
def test_short_train_rows_beyond_max_batch_are_refused_before_conversion(
    trainer: Running, body: Any
) -> None:
    reply = train(trainer, body)
    assert reply.status == 400, reply
    assert "100 rows; the model takes at most 64 per request" in reply.json()["error"]


def test_model_without_training_answers_404(trainer: Running) -> None:
    for path in ("/models/frozen/train", "/v2/models/frozen/train"):
        reply = call(trainer, "POST", path, {"inputs": [[0, 1]], "targets": [[1]]})
        assert reply.status == 404
        assert "does not accept training" in reply.json()["error"]


def test_concurrent_requests_merge_into_one_step(trainer: Running) -> None:
    bodies = [
        raw_request("/models/xor/train", b'{"inputs": [[0, 1]], "targets": [[1]]}')
        for _ in range(12)
    ]
    replies = send_together(trainer, bodies)
    assert all(r.status == 200 for r in replies), replies
    steps = {r.json()["step"] for r in replies}
    assert len(steps) < 12  # merged: fewer steps than requests
    status = call(trainer, "GET", "/models/xor/train").json()
    assert status["step"] == max(steps) and status["examples"] == 12


def test_max_batch_1_takes_one_step_per_request(tmp_path: Path) -> None:
    with serve_in_thread(train_config(tmp_path, max_batch=1)) as running:
        bodies = [
            raw_request("/models/xor/train", b'{"inputs": [[0, 1]], "targets": [[1]]}')
            for _ in range(6)
        ]
        replies = send_together(running, bodies)
        assert sorted(r.json()["step"] for r in replies) == [1, 2, 3, 4, 5, 6]


def test_an_example_that_breaks_the_model_fails_alone(trainer: Running) -> None:
    values = [1.0, -1.0, 2.0, -2.0, 3.0]
    bodies = [
        raw_request("/models/fragile/train", b'{"inputs": [[%f]], "targets": [[0]]}' % v)
        for v in values
    ]
    before = metrics(trainer)
    replies = send_together(trainer, bodies)
    assert [r.status for r in replies] == [200, 422, 200, 422, 200], replies
    assert "negative input" in replies[1].json()["error"]
    status = call(trainer, "GET", "/models/fragile/train").json()
    assert status["examples"] == 3
    after = metrics(trainer)
    assert metric(after, "webtorch_train_examples_total", model="fragile") == 3
    assert metric(after, "webtorch_train_steps_total", model="fragile") == status["step"]
    assert (
        metric(after, "webtorch_model_errors_total", model="fragile")
        - metric(before, "webtorch_model_errors_total", model="fragile")
        == 2
    )


def test_training_and_inference_together_answer_everyone(trainer: Running) -> None:
    bodies = []
    for i in range(20):
        if i % 2:
            bodies.append(raw_request("/models/xor/predict", b'{"inputs": [[0, 1]]}'))
        else:
            bodies.append(
                raw_request("/models/xor/train", b'{"inputs": [[0, 1]], "targets": [[1]]}')
            )
    replies = send_together(trainer, bodies)
    assert all(r.status == 200 for r in replies), replies
    assert all("outputs" in r.json() for r in replies[1::2])
    assert all("step" in r.json() for r in replies[0::2])


def test_token_protects_training(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, server={"token": TOKEN})
    with serve_in_thread(cfg) as running:
        body = {"inputs": [[0, 1]], "targets": [[1]]}
        missing = train(running, body)
        assert missing.status == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in missing.json()["error"]
        wrong = train(running, body, Authorization="Bearer wrong-token-0123456789")
        assert wrong.status == 401 and "invalid" in wrong.json()["error"]
        assert call(running, "GET", "/models/xor/train").status == 401
        ok = train(running, body, Authorization=f"Bearer {TOKEN}")
        assert ok.status == 200
        # Inference stays open.
        assert predict(running, "xor", [[0, 1]]).status == 200


def test_training_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.token"):
        train_config(tmp_path, server={"listen": "0.0.0.0:8080"})
    train_config(tmp_path, server={"listen": "0.0.0.0:8080", "token": TOKEN})  # accepted


def test_start_on_a_public_address_without_token_is_refused(tmp_path: Path) -> None:
    # --listen can move a checked config off loopback: start checks again.
    app = App(train_config(tmp_path))
    with pytest.raises(ConfigError, match="beyond this machine"):
        asyncio.run(app.start(host="0.0.0.0", port=0))


def test_durability_none_writes_nothing(tmp_path: Path) -> None:
    with serve_in_thread(train_config(tmp_path, durability="none")) as running:
        assert train(running, {"inputs": [[0, 1]], "targets": [[1]]}).status == 200
    assert not (tmp_path / "state").exists()


def test_checkpoint_mode_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, durability="checkpoint")
    with serve_in_thread(cfg) as running:
        for _ in range(3):
            assert train(running, {"inputs": [[0, 1]], "targets": [[1]]}).status == 200
        weights = predict(running, "xor", [[0, 1]]).json()
    assert not (tmp_path / "state" / "wal").exists()
    with serve_in_thread(cfg) as running:  # graceful stop wrote a checkpoint at step 3
        assert call(running, "GET", "/models/xor/train").json()["step"] == 3
        assert predict(running, "xor", [[0, 1]]).json() == weights


def test_a_train_request_with_non_numbers_in_a_batch_gets_400_alone(trainer: Running) -> None:
    # Short-form rows are checked when the micro-batch converts them: a bad one must not cost
    # the others their step, and must get a 400 naming the problem.
    bodies = [
        b'{"inputs": [[0, 1]], "targets": [[1]]}',
        b'{"inputs": [[0, "one"]], "targets": [[1]]}',
        b'{"inputs": [[1, 1]], "targets": [[0]]}',
        b'{"inputs": [[1, 0]], "targets": [[null]]}',
    ]
    replies = send_together(trainer, [raw_request("/models/xor/train", b) for b in bodies])
    assert [r.status for r in replies] == [200, 400, 200, 400], replies
    assert "input 'x'" in replies[1].json()["error"]
    assert "target 'y'" in replies[3].json()["error"]
    assert call(trainer, "GET", "/models/xor/train").json()["examples"] == 2


def test_an_example_with_a_non_finite_loss_is_refused_alone(trainer: Running) -> None:
    # fragile's loss is (x * scale - y)^2: a finite FP32 input can still overflow it.
    bodies = [
        b'{"inputs": [[1]], "targets": [[0]]}',
        b'{"inputs": [[3e38]], "targets": [[-3e38]]}',
        b'{"inputs": [[2]], "targets": [[0]]}',
    ]
    replies = send_together(trainer, [raw_request("/models/fragile/train", b) for b in bodies])
    assert [r.status for r in replies] == [200, 422, 200], replies
    assert "the loss is inf" in replies[1].json()["error"]
    status = call(trainer, "GET", "/models/fragile/train").json()
    assert status["examples"] == 2 and status["loss"] == status["loss"]  # not NaN


def test_values_beyond_the_datatype_are_400(trainer: Running) -> None:
    for path, body in [
        ("/models/xor/train", {"inputs": [[1e39, 1]], "targets": [[1]]}),
        ("/models/xor/predict", {"inputs": [[1e39, 1]]}),
        ("/models/xor/predict", {"inputs": [[[1e39, 1]]]}),
    ]:
        reply = call(trainer, "POST", path, body)
        assert reply.status == 400, (path, reply)
        assert "out of range for FP32" in reply.json()["error"]


def test_a_full_train_queue_sheds_load_with_503(tmp_path: Path) -> None:
    with serve_in_thread(train_config(tmp_path, max_queue=2, max_batch=1)) as running:
        body = b'{"inputs": [[0, 1]], "targets": [[1]]}'
        replies = send_together(running, [raw_request("/models/xor/train", body)] * 5)
        statuses = sorted(r.status for r in replies)
        assert statuses.count(503) >= 1 and statuses.count(200) >= 2, replies
        shed = next(r for r in replies if r.status == 503)
        assert "train queue is full" in shed.json()["error"]


def test_the_token_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEBTORCH_TEST_TOKEN", TOKEN)
    with serve_in_thread(train_config(tmp_path, server={"token_env": "WEBTORCH_TEST_TOKEN"})) as r:
        body = {"inputs": [[0, 1]], "targets": [[1]]}
        assert train(r, body).status == 401
        assert train(r, body, Authorization=f"Bearer {TOKEN}").status == 200
    monkeypatch.delenv("WEBTORCH_TEST_TOKEN")
    with pytest.raises(ConfigError, match="WEBTORCH_TEST_TOKEN is unset"):
        train_config(tmp_path, server={"token_env": "WEBTORCH_TEST_TOKEN"})


def test_a_model_without_loss_cannot_enable_training(tmp_path: Path) -> None:
    (tmp_path / "plain.py").write_text(
        "import torch, webtorch\n"
        "model = webtorch.Model(network=torch.nn.Identity(),\n"
        "    inputs=[webtorch.TensorSpec('x', 'FP32', (-1, 1))],\n"
        "    outputs=[webtorch.TensorSpec('y', 'FP32', (-1, 1))])\n"
    )
    cfg = wt_config.from_dict(
        {"models": {"plain": {"path": str(tmp_path / "plain.py"), "train": {"enabled": True}}}}
    )
    with pytest.raises(ModelLoadError, match="defines no `loss` and `optimizer`"):
        App(cfg)


@pytest.mark.parametrize("bad_id", [{"a": 1}, 7, ["r1"]])
def test_oip_train_id_must_be_a_string(trainer: Running, bad_id: Any) -> None:
    # It is echoed in the answer: str() of it would answer a Python repr (issue 19, item 7).
    body = {
        "id": bad_id,
        "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0, 1]}],
        "targets": [{"name": "y", "shape": [1, 1], "datatype": "FP32", "data": [1]}],
    }
    reply = call(trainer, "POST", "/v2/models/xor/train", body)
    assert reply.status == 400 and '"id" must be a string' in reply.json()["error"]
    assert call(trainer, "GET", "/models/xor/train").json()["step"] == 0
