"""The OIP model repository extension: index, load, reload and unload at runtime, safely."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import XOR, Running, serve_in_thread
from tests.serve.test_server_models import Reply, call, predict
from webtorch import config as wt_config
from webtorch.errors import ConfigError

TOKEN = "management-token-0123"

SCALE_PY = """
import torch
from torch import nn
import webtorch


class Scale(nn.Module):
    def forward(self, x):
        return x * {factor}


model = webtorch.Model(
    network=Scale,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 1))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 1))],
)
"""


def repo_config(tmp_path: Path, **server: Any) -> Any:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    (models / "scale.py").write_text(SCALE_PY.format(factor=2))
    (models / "broken.py").write_text("this is not python\n")
    data = {
        "server": {"management": True, "model_dir": str(models), **server},
        "models": {
            "xor": {
                "path": str(XOR),
                "train": {"enabled": True, "state_dir": str(tmp_path / "state")},
            }
        },
    }
    return wt_config.from_dict(data)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    with serve_in_thread(repo_config(tmp_path)) as server:
        yield server


def post(running: Running, path: str, body: Any = None, **headers: str) -> Reply:
    """A management POST as clients send it: JSON, even with no body (see test_csrf.py)."""
    headers = {"Content-Type": "application/json", **headers}
    return call(running, "POST", path, body if body is not None else b"", headers)


class Answers:
    """Replies collected by client threads; the test waits on their count, not on time."""

    def __init__(self) -> None:
        self.items: list[Reply] = []
        self.changed = threading.Condition()

    def add(self, reply: Reply) -> None:
        with self.changed:
            self.items.append(reply)
            self.changed.notify_all()

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.items) >= count, 60)


def reload_while_clients_run(
    running: Running, name: str, send: Callable[[], Reply], before: int
) -> list[Reply]:
    """Four client threads call ``send`` in a loop; after ``before`` replies ``name`` is
    reloaded, and 20 replies later the clients stop. Returns every reply."""
    answers = Answers()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            answers.add(send())

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        answers.wait_for(before)
        assert post(running, f"/v2/repository/models/{name}/load").status == 200
        answers.wait_for(len(answers.items) + 20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    return answers.items


def index(running: Running) -> dict[str, dict[str, Any]]:
    reply = post(running, "/v2/repository/index")
    assert reply.status == 200, reply
    return {entry["name"]: entry for entry in reply.json()}


def test_index_lists_configured_models_and_model_dir_files(running: Running) -> None:
    entries = index(running)
    assert entries["xor"]["state"] == "READY"
    assert entries["scale"]["state"] == "UNAVAILABLE"
    assert entries["broken"]["state"] == "UNAVAILABLE"
    assert "model_repository" in call(running, "GET", "/v2").json()["extensions"]


def test_load_and_unload_a_model_from_model_dir(running: Running) -> None:
    assert predict(running, "scale", [[3]]).status == 404
    assert post(running, "/v2/repository/models/scale/load").status == 200
    assert predict(running, "scale", [[3]]).json() == {"outputs": [[6.0]]}
    assert index(running)["scale"]["state"] == "READY"
    assert post(running, "/v2/repository/models/scale/unload").status == 200
    assert predict(running, "scale", [[3]]).status == 404
    assert index(running)["scale"]["state"] == "UNAVAILABLE"
    assert post(running, "/v2/repository/models/scale/unload").status == 404


@pytest.mark.parametrize(
    "name", ["..%2Fmodels%2Fscale", "%2E%2E", "nothere", "scale.py", "..", "%2Fetc%2Fpasswd"]
)
def test_only_files_in_model_dir_by_plain_name(running: Running, name: str) -> None:
    reply = post(running, f"/v2/repository/models/{name}/load")
    assert reply.status in (400, 404), reply
    assert "error" in reply.json()


def test_a_symlink_out_of_model_dir_is_refused(running: Running, tmp_path: Path) -> None:
    outside = tmp_path / "outside.py"
    outside.write_text(SCALE_PY.format(factor=5))
    (tmp_path / "models" / "sneaky.py").symlink_to(outside)
    reply = post(running, "/v2/repository/models/sneaky/load")
    assert reply.status == 404 and "not in the model directory" in reply.json()["error"]


def test_load_parameters_are_refused(running: Running) -> None:
    body = {"parameters": {"config": '{"backend": "python"}', "file:1/model.py": "aW1wb3J0IG9z"}}
    reply = post(running, "/v2/repository/models/scale/load", body)
    assert reply.status == 400 and "not accepted" in reply.json()["error"]


def test_a_broken_model_file_fails_to_load_with_its_reason(running: Running) -> None:
    reply = post(running, "/v2/repository/models/broken/load")
    assert reply.status == 400 and "failed to load model 'broken'" in reply.json()["error"]
    assert "failed to import" in index(running)["broken"]["reason"]
    assert predict(running, "xor", [[0, 1]]).status == 200  # everyone else is served


def test_reload_swaps_the_model_while_requests_flow(running: Running, tmp_path: Path) -> None:
    assert post(running, "/v2/repository/models/scale/load").status == 200
    (tmp_path / "models" / "scale.py").write_text(SCALE_PY.format(factor=10))
    replies = reload_while_clients_run(
        running, "scale", lambda: predict(running, "scale", [[1]]), before=10
    )
    assert all(a.status == 200 for a in replies), [a for a in replies if a.status != 200][:3]
    values = [a.json()["outputs"][0][0] for a in replies]
    assert set(values) <= {2.0, 10.0}
    assert predict(running, "scale", [[1]]).json() == {"outputs": [[10.0]]}


def test_reload_of_a_trainable_model_keeps_its_training(running: Running) -> None:
    for _ in range(3):
        reply = post(running, "/models/xor/train", {"inputs": [[0, 1]], "targets": [[1]]})
        assert reply.status == 200
    trained = predict(running, "xor", [[0, 1]]).json()
    assert post(running, "/v2/repository/models/xor/load").status == 200
    status = call(running, "GET", "/models/xor/train").json()
    assert status["step"] == 3  # recovered from the checkpoint the old executor wrote
    assert predict(running, "xor", [[0, 1]]).json() == trained
    reply = post(running, "/models/xor/train", {"inputs": [[0, 1]], "targets": [[1]]})
    assert reply.json()["step"] == 4


def test_management_is_off_unless_enabled() -> None:
    cfg = wt_config.from_dict({"models": {"xor": {"path": str(XOR)}}})
    with serve_in_thread(cfg) as server:
        reply = post(server, "/v2/repository/index")
        assert reply.status == 404 and "management = true" in reply.json()["error"]
        assert "model_repository" not in call(server, "GET", "/v2").json()["extensions"]


def test_management_needs_the_token(tmp_path: Path) -> None:
    with serve_in_thread(repo_config(tmp_path, token=TOKEN)) as server:
        assert post(server, "/v2/repository/index").status == 401
        assert post(server, "/v2/repository/models/scale/load").status == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert post(server, "/v2/repository/models/scale/load", **auth).status == 200


def test_management_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="management endpoints"):
        wt_config.from_dict({"server": {"listen": "0.0.0.0:80", "management": True}, "models": {}})


def test_reload_under_training_load_loses_no_example(running: Running) -> None:
    body = {"inputs": [[0, 1]], "targets": [[1]]}
    replies = reload_while_clients_run(
        running, "xor", lambda: post(running, "/models/xor/train", body), before=20
    )
    assert all(a.status == 200 for a in replies), [a for a in replies if a.status != 200][:3]
    status = call(running, "GET", "/models/xor/train").json()
    assert status["step"] == max(a.json()["step"] for a in replies)
    # Every acknowledged example is in the model: none lost across the swap, none twice.
    assert status["examples"] == len(replies)
