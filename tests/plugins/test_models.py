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


MISSHAPEN = """
import asyncio

class Misshapen:
    async def request_body(self, ctx, body):
        from webtorch.plugins import Response
        xor = ctx.model("xor")
        # one loop turn: both join one micro-batch, whose targets cannot be concatenated
        good, bad = await asyncio.gather(
            xor.train([[0.0, 1.0]], [[1.0]]),
            xor.train([[1.0, 1.0]], [[0.0, 1.0, 2.0]]),
            return_exceptions=True,
        )
        return Response(200, repr((good, bad)).encode())

plugin = Misshapen()
"""


def test_a_train_request_that_does_not_fit_the_batch_is_refused_alone(tmp_path: Path) -> None:
    """Arrays from a plugin skip the HTTP forms' checks: one whose targets have another shape
    than the others' gets its own 400, the rest of its micro-batch trains, and training goes on
    (the batch failing to form once stopped the executor with every request in it unanswered)."""
    write_plugins(tmp_path, {"misshapen": MISSHAPEN})
    path = config(
        tmp_path,
        [{"path": "misshapen.py"}],
        routes=[{"path": "/learn", "return": 404}],
        models={
            "xor": {
                "path": str(XOR),
                "train": {"enabled": True, "state_dir": str(tmp_path / "state")},
            }
        },
    )
    with serving(path) as running:
        for _ in range(2):  # and again: the executor still trains
            status, _, body = request(running, "POST", "/learn", body=b"x")
            assert status == 200
            good, bad = body.decode().split(", ", 1)
            assert float(good.lstrip("(")) > 0
            assert "answered 400" in bad and "does not fit model" in bad, bad
