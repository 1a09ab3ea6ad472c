"""Placement changes: the same pipeline answers the same on the loop, threads and processes;
a stage held up on its pool does not hold the server up."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import serve_in_thread
from tests.pipeline.test_server import TEXT
from tests.serve.test_server_models import Reply, call, metric, metrics
from webtorch import config as wt_config
from webtorch.pipeline.spec import import_pipeline_file

GATED = Path(__file__).resolve().parent / "files" / "gated.py"
DOCS = ["Hello World", "  Some MORE text here ", "x", "a b c d e f"]


def answers(placement: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    stages = {
        name: {"placement": placement, "workers": 2} for name in ("clean", "measure", "score")
    }
    cfg = wt_config.from_dict({"pipelines": {"text": {"path": str(TEXT), "stages": stages}}})
    with serve_in_thread(cfg) as running:
        ok = call(running, "POST", "/pipelines/text/predict", {"records": DOCS})
        bad = call(running, "POST", "/pipelines/text/predict", {"records": ["fine", "boom"]})
        meta = json.loads(call(running, "GET", "/v2/pipelines/text").body)
        assert ok.status == 200, ok.body
        assert all(s["placement"] == placement for s in meta["stages"])
    return [json.loads(ok.body), json.loads(bad.body)], meta


@pytest.mark.parametrize("placement", ["thread", "process"])
def test_the_same_pipeline_answers_the_same_on_every_placement(placement: str) -> None:
    on_loop, _ = answers("loop")
    moved, meta = answers(placement)
    assert moved == on_loop
    assert on_loop[1]["stage"] == "clean" and on_loop[1]["record"] == 1
    assert meta["stages"][0]["workers"] == 2


def test_process_placement_runs_in_other_processes_and_counts_bytes() -> None:
    cfg = wt_config.from_dict(
        {
            "pipelines": {
                "text": {
                    "path": str(TEXT),
                    "stages": {"measure": {"placement": "process"}},
                },
            }
        }
    )
    with serve_in_thread(cfg) as running:
        reply = call(running, "POST", "/pipelines/text/predict", ["a b"])
        assert reply.status == 200
        samples = metrics(running)
        labels = {"pipeline": "text", "stage": "measure"}
        sent = metric(samples, "webtorch_pipeline_stage_bytes_total", **labels, direction="in")
        got = metric(samples, "webtorch_pipeline_stage_bytes_total", **labels, direction="out")
        assert sent > 0 and got > 0
        clean = metric(
            samples,
            "webtorch_pipeline_stage_bytes_total",
            pipeline="text",
            stage="clean",
            direction="in",
        )
        assert clean == 0  # on the loop nothing is serialized


def test_a_held_stage_on_threads_does_not_stall_other_requests() -> None:
    module = import_pipeline_file(GATED)
    hold = next(s for s in module.stages if s.name == "hold")
    assert hold.fn is not None
    gate: threading.Event = hold.fn.__globals__["GATE"]
    entered: threading.Event = hold.fn.__globals__["ENTERED"]
    gate.clear()
    entered.clear()
    cfg = wt_config.from_dict(
        {
            "pipelines": {
                "gated": {
                    "path": str(GATED),
                    "stages": {"hold": {"placement": "thread", "workers": 2, "max_batch": 1}},
                },
                "text": {"path": str(TEXT)},
            }
        }
    )
    with serve_in_thread(cfg) as running:
        held: list[Reply] = []
        waiting = threading.Thread(
            target=lambda: held.append(call(running, "POST", "/pipelines/gated/predict", ["wait"]))
        )
        waiting.start()
        try:
            assert entered.wait(30)  # its batch is on a worker, blocked
            # Meanwhile the same stage's other worker, and other pipelines, keep answering.
            other = call(running, "POST", "/pipelines/gated/predict", ["go"])
            assert other.status == 200 and json.loads(other.body)["outputs"] == ["GO"]
            text = call(running, "POST", "/pipelines/text/predict", ["x"])
            assert text.status == 200
            assert not held
        finally:
            gate.set()
            waiting.join(30)
        assert held[0].status == 200 and json.loads(held[0].body)["outputs"] == ["WAIT"]
