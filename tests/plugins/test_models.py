"""Torch at hand: a plugin's ``await ctx.model(...).predict(...)`` goes through the model's
executor (batched with HTTP requests to it), and ``train`` through its trainer and WAL."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import XOR
from tests.plugins.helpers import config, request, serving, write_plugins

SCORE = """
import numpy as np

class Score:
    async def request(self, ctx):
        outputs = await ctx.model("xor").predict(np.array([[0.0, 1.0], [1.0, 1.0]]))
        ctx.state["y"] = [round(float(v), 6) for v in outputs["y"].reshape(-1)]

    def response(self, ctx, response):
        response.headers.append((b"x-xor", repr(ctx.state["y"]).encode()))

    async def request_body(self, ctx, body):
        if ctx.path == "/learn":
            loss = await ctx.model("xor").train([[0.0, 1.0]], [[1.0]])
            ctx.state["loss"] = loss
            from webtorch.plugins import Response
            return Response(200, repr(loss).encode())

plugin = Score()
"""


def test_predict_and_train_from_a_plugin(tmp_path: Path) -> None:
    write_plugins(tmp_path, {"score": SCORE})
    path = config(
        tmp_path,
        [{"path": "score.py"}],
        routes=[
            {"path": "/fixed", "return": 200, "body": "fixed"},
            {"path": "/learn", "return": 404},
        ],
        models={
            "xor": {
                "path": str(XOR),
                "train": {"enabled": True, "state_dir": str(tmp_path / "state")},
            }
        },
    )
    with serving(path) as running:
        status, headers, _ = request(running, "GET", "/fixed")
        assert status == 200
        from_plugin = json.loads(headers["x-xor"])
        # the same answer the model's own endpoint gives
        _, _, body = request(
            running,
            "POST",
            "/models/xor/predict",
            body=b'{"inputs": [[0, 1], [1, 1]]}',
            headers={"Content-Type": "application/json"},
        )
        direct = [round(v[0], 6) for v in json.loads(body)["outputs"]]
        assert from_plugin == direct
        status, _, body = request(running, "POST", "/learn", body=b"x")
        assert status == 200 and float(body) > 0
        assert running.app.executors["xor"].trainer is not None
    # the example went through the trainer's WAL
    assert any((tmp_path / "state").rglob("*"))
