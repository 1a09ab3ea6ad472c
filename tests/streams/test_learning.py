"""Learning from the stream (streams/models.py): labelled items, with the item or later by its
id, train the model through its trainer (WAL first, then the step), answered on the stream with
the step; the stream's predictions move toward the labels. Labels need what the HTTP train
endpoints need (training on, the token, a same-site sender)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import Running, serve_in_thread
from tests.streams.conftest import MODELS, ws_url
from webtorch import config as wt_config

GRU = "/v2/models/gru/stream"


def _server(tmp_path: Path, **server: Any) -> Any:
    data: dict[str, Any] = {
        "models": {
            "gru": {
                "path": str(MODELS / "gru.py"),
                "train": {"enabled": True, "state_dir": str(tmp_path / "state")},
            }
        },
        "streams": {"label_window": 4},
    }
    if server:
        data["server"] = server
    return serve_in_thread(wt_config.from_dict(data))


def _answers(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    return [json.loads(ws.recv(timeout=30)) for _ in range(n)]


def _error(running: Running, ws: ClientConnection) -> str:
    return str(json.loads(ws.recv(timeout=30))["error"])


def test_labelled_items_train_the_model_through_its_wal(tmp_path: Path) -> None:
    target = [1.0, -1.0, 0.5, 0.0]
    x = [0.3, -0.2, 0.1]
    with _server(tmp_path) as running, connect(ws_url(running, GRU + "?stream=t")) as ws:
        ws.recv(timeout=30)
        ws.send(json.dumps({"id": "before", "x": x}))
        before = np.array(_answers(ws, 1)[0]["outputs"]["y"])
        steps = []
        for i in range(30):
            ws.send(json.dumps({"id": i, "x": x, "label": {"y": target}}))
            got = _answers(ws, 2)  # its prediction, then its training step (in that order)
            assert got[0]["id"] == i and "outputs" in got[0]
            assert got[1]["id"] == i and got[1]["trained"]["loss"] >= 0
            steps.append(got[1]["trained"]["step"])
        assert steps == sorted(steps) and steps[-1] >= 1
        ws.send(json.dumps({"id": "after", "x": x}))
        after = np.array(_answers(ws, 1)[0]["outputs"]["y"])
    assert np.abs(after - target).sum() < np.abs(before - target).sum()
    wal = list((tmp_path / "state").rglob("*wal*"))
    assert wal, "the labelled items were logged to the model's WAL"


def test_a_label_may_follow_its_item_by_id(tmp_path: Path) -> None:
    with _server(tmp_path) as running, connect(ws_url(running, GRU)) as ws:
        ws.recv(timeout=30)
        for i in range(6):
            ws.send(json.dumps({"id": f"s{i}", "x": [i, 0, 1]}))
        assert [a["id"] for a in _answers(ws, 6)] == [f"s{i}" for i in range(6)]
        ws.send(json.dumps({"for": "s5", "label": {"y": [0, 0, 0, 1]}}))
        trained = json.loads(ws.recv(timeout=30))
        assert trained["id"] == "s5" and "step" in trained["trained"]
        # label_window = 4: s1 is gone, and a label applies once.
        ws.send(json.dumps({"for": "s1", "label": {"y": [0, 0, 0, 1]}}))
        assert "last 4 items" in _error(running, ws)
        ws.send(json.dumps({"for": "s5", "label": {"y": [0, 0, 0, 1]}}))
        assert "last 4 items" in _error(running, ws)
        ws.send(json.dumps({"for": "s4", "label": {"y": [0, 0]}}))
        assert "shape [2], expected [4]" in _error(running, ws)


@pytest.mark.parametrize(
    ("headers", "refusal"),
    [
        ({}, "needs `Authorization: Bearer <token>`"),
        (
            {"Authorization": "Bearer s3cret-s3cret-s3cret", "Origin": "http://evil.example"},
            "not this server",
        ),
    ],
)
def test_labels_need_the_token_and_a_same_site_sender(
    tmp_path: Path, headers: dict[str, str], refusal: str
) -> None:
    with _server(tmp_path, token="s3cret-s3cret-s3cret") as running:
        with connect(ws_url(running, GRU), additional_headers=headers) as ws:
            ws.recv(timeout=30)
            ws.send(json.dumps({"x": [1, 2, 3], "label": {"y": [0, 0, 0, 0]}}))
            assert refusal in _error(running, ws)
            ws.send(json.dumps({"id": 1, "x": [1, 2, 3]}))  # predictions are still served
            assert "outputs" in json.loads(ws.recv(timeout=30))
        with connect(
            ws_url(running, GRU),
            additional_headers={"Authorization": "Bearer s3cret-s3cret-s3cret"},
        ) as ws:
            ws.recv(timeout=30)
            ws.send(json.dumps({"id": 2, "x": [1, 2, 3], "label": {"y": [0, 0, 0, 0]}}))
            assert "trained" in _answers(ws, 2)[1]


def test_labels_for_a_model_that_does_not_train_are_refused() -> None:
    from tests.streams.conftest import stream_server

    with stream_server() as running, connect(ws_url(running, GRU)) as ws:
        ws.recv(timeout=30)
        ws.send(json.dumps({"x": [1, 2, 3], "label": {"y": [0, 0, 0, 0]}}))
        assert "does not train" in json.loads(ws.recv(timeout=30))["error"]
