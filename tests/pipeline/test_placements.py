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


def test_a_request_past_the_pipelines_timeout_answers_504_naming_the_stage() -> None:
    module = import_pipeline_file(GATED)
    hold = next(s for s in module.stages if s.name == "hold")
    assert hold.fn is not None
    gate: threading.Event = hold.fn.__globals__["GATE"]
    gate.clear()
    cfg = wt_config.from_dict(
        {
            "pipelines": {
                "gated": {
                    "path": str(GATED),
                    "timeout": 0.05,
                    "stages": {"hold": {"placement": "thread"}},
                }
            }
        }
    )
    with serve_in_thread(cfg) as running:
        try:
            reply = call(running, "POST", "/pipelines/gated/predict", ["wait"])
        finally:
            gate.set()
        assert reply.status == 504
        assert json.loads(reply.body)["error"] == (
            "pipeline 'gated' timed out after 0.05 s in stage 'hold'"
        )
        # Its worker comes back; the pipeline keeps answering.
        again = call(running, "POST", "/pipelines/gated/predict", ["go"])
        assert again.status == 200


def test_a_record_that_kills_its_worker_fails_alone_and_the_pool_recovers() -> None:
    from tests.serve.test_server_models import raw_request, send_together

    crashy = Path(__file__).resolve().parent / "files" / "crashy.py"
    cfg = wt_config.from_dict(
        {"pipelines": {"c": {"path": str(crashy), "stages": {"risky": {"placement": "process"}}}}}
    )
    with serve_in_thread(cfg) as running:

        def raw(records: list[str]) -> bytes:
            return raw_request("/pipelines/c/predict", json.dumps(records).encode())

        replies = send_together(running, [raw(["ok"]), raw(["x", "die"]), raw(["fine"])])
        assert [r.status for r in replies] == [200, 500, 200]
        failed = json.loads(replies[1].body)
        assert failed["stage"] == "risky" and failed["record"] == 1
        assert json.loads(replies[2].body)["outputs"] == ["FINE"]
        after = call(running, "POST", "/pipelines/c/predict", ["later"])
        assert after.status == 200 and json.loads(after.body)["outputs"] == ["LATER"]


def test_a_file_that_fails_in_its_workers_fails_the_start(tmp_path: Path) -> None:
    # Imports in the server (which checks the file), raises in a worker process.
    (tmp_path / "p.py").write_text(
        "import multiprocessing\n"
        "import webtorch\n"
        "if multiprocessing.parent_process() is not None:\n"
        "    raise RuntimeError('no GPU in the workers')\n"
        "pipeline = webtorch.Pipeline([webtorch.stage(lambda rows: rows, name='s')])\n"
    )
    stages = {"s": {"placement": "process"}}
    cfg = wt_config.from_dict(
        {"pipelines": {"p": {"path": str(tmp_path / "p.py"), "stages": stages}}}
    )
    from webtorch.errors import ConfigError

    with (
        pytest.raises(ConfigError, match=r"pipelines\.p\.stages\.s: its worker processes could"),
        serve_in_thread(cfg),
    ):
        pass


def test_a_worker_stuck_at_shutdown_is_ended(tmp_path: Path) -> None:
    hang = Path(__file__).resolve().parent / "files" / "hang.py"
    cfg = wt_config.from_dict(
        {
            "pipelines": {
                "h": {
                    "path": str(hang),
                    "timeout": 0.2,
                    "stages": {"stall": {"placement": "process"}},
                }
            }
        }
    )
    with serve_in_thread(cfg) as running:
        pid = json.loads(call(running, "POST", "/pipelines/h/predict", ["x"]).body)["outputs"][0]
        assert call(running, "POST", "/pipelines/h/predict", ["hang"]).status == 504
        pipelines = running.app.pipelines
        assert pipelines is not None
        runner = pipelines.served["h"].runner
        assert runner is not None
        placement = runner.stages["stall"].placement
        placement.close_grace = 0.2  # type: ignore[attr-defined]
    # The server stopped: the stuck worker was terminated and reaped.
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "\nState:\tZ" in status.read_text()
