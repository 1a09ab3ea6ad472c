"""Model stages: a served model inside a pipeline, through its executor; training through the
pipeline's stages into the model's training pipeline (WAL, recovery, the train gate)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import XOR, Running, serve_in_thread
from tests.serve.test_server_models import Reply, call
from webtorch import config as wt_config
from webtorch.errors import ConfigError

PIPE = Path(__file__).resolve().parent / "files" / "xorpipe.py"
TOKEN = "pipeline-token-0123456789"


def pipeline_config(state: Path, token: str | None = None, **stages: Any) -> wt_config.Config:
    data: dict[str, Any] = {
        "models": {"xor": {"path": str(XOR), "train": {"enabled": True, "state_dir": str(state)}}},
        "pipelines": {"xor": {"path": str(PIPE), "stages": stages}},
    }
    if token is not None:
        data["server"] = {"token": token}
    return wt_config.from_dict(data)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    with serve_in_thread(pipeline_config(tmp_path / "state")) as running:
        yield running


def predict(running: Running, records: list[Any]) -> Reply:
    return call(running, "POST", "/pipelines/xor/predict", {"records": records})


def train(running: Running, records: list[Any], targets: Any, **headers: str) -> Reply:
    return call(
        running, "POST", "/pipelines/xor/train", {"records": records, "targets": targets}, headers
    )


def test_a_model_stage_answers_as_the_model_does(server: Running) -> None:
    reply = predict(server, ["0,1", "1,1", "0,0", "1,0"])
    assert reply.status == 200, reply.body
    outputs = json.loads(reply.body)["outputs"]
    assert [o["xor"] for o in outputs] == [1, 0, 0, 1]  # the shipped weights know XOR
    direct = call(server, "POST", "/models/xor/predict", {"inputs": [[0, 1]]})
    assert outputs[0]["p"] == pytest.approx(json.loads(direct.body)["outputs"][0][0], abs=1e-4)
    timing = reply.headers["server-timing"]
    assert [e.split(";")[0] for e in timing.split(", ")] == ["parse", "xor", "label"]


def test_training_through_the_pipeline_teaches_the_model(server: Running) -> None:
    before = json.loads(predict(server, ["0,1"]).body)["outputs"][0]["p"]
    steps = []
    for _ in range(15):
        reply = train(server, ["0,1"], [[0.0]])
        assert reply.status == 200, reply.body
        steps.append(json.loads(reply.body)["step"])
    assert steps == list(range(1, 16))
    after = json.loads(predict(server, ["0,1"]).body)["outputs"][0]["p"]
    assert after < before - 0.1  # the pipeline's own predictions moved: one model
    status = json.loads(call(server, "GET", "/models/xor/train").body)
    assert status["step"] == 15 and status["durability"] == "wal"


def test_trained_steps_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with serve_in_thread(pipeline_config(state)) as running:
        for _ in range(3):
            assert train(running, ["1,1", "0,0"], [[1.0], [1.0]]).status == 200
        trained = json.loads(predict(running, ["1,1"]).body)["outputs"][0]["p"]
    with serve_in_thread(pipeline_config(state)) as running:
        status = json.loads(call(running, "GET", "/models/xor/train").body)
        assert status["step"] == 3
        again = json.loads(predict(running, ["1,1"]).body)["outputs"][0]["p"]
        assert again == pytest.approx(trained, abs=1e-4)


def test_idempotency_key_trains_once(server: Running) -> None:
    first = train(server, ["0,1"], [[0.0]], **{"Idempotency-Key": "k-1"})
    again = train(server, ["0,1"], [[0.0]], **{"Idempotency-Key": "k-1"})
    assert first.status == again.status == 200
    assert json.loads(first.body) == json.loads(again.body)
    assert json.loads(call(server, "GET", "/models/xor/train").body)["step"] == 1


def test_a_rejected_training_record_is_422_and_trains_nothing(server: Running) -> None:
    reply = train(server, ["0,1", "nonsense"], [[0.0], [1.0]])
    assert reply.status == 422
    assert json.loads(reply.body)["error"].startswith("stage 'parse' rejected record 1")
    assert json.loads(call(server, "GET", "/models/xor/train").body)["step"] == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"records": ["0,1"]}, '"targets"'),
        ({"records": ["0,1", "1,1"], "targets": [[1.0]]}, "2 records but 1 rows"),
        ({"records": ["0,1"], "targets": [["x"]]}, "target 'y'"),
    ],
)
def test_bad_train_bodies_are_400(server: Running, body: Any, message: str) -> None:
    reply = call(server, "POST", "/pipelines/xor/train", body)
    assert reply.status == 400 and message in json.loads(reply.body)["error"], reply.body


def test_training_needs_the_token_and_refuses_cross_site_bodies(tmp_path: Path) -> None:
    with serve_in_thread(pipeline_config(tmp_path / "state", token=TOKEN)) as running:
        body = json.dumps({"records": ["0,1"], "targets": [[0.0]]}).encode()
        as_text = call(
            running, "POST", "/pipelines/xor/train", body, {"Content-Type": "text/plain"}
        )
        assert as_text.status == 415
        assert train(running, ["0,1"], [[0.0]]).status == 401
        authorized = train(running, ["0,1"], [[0.0]], Authorization=f"Bearer {TOKEN}")
        assert authorized.status == 200
        assert predict(running, ["0,1"]).status == 200  # predicting needs no token


def test_a_model_stage_for_a_model_that_does_not_train(tmp_path: Path) -> None:
    cfg = wt_config.from_dict(
        {"models": {"xor": {"path": str(XOR)}}, "pipelines": {"xor": {"path": str(PIPE)}}}
    )
    with serve_in_thread(cfg) as running:
        reply = train(running, ["0,1"], [[0.0]])
        assert reply.status == 404 and b"no model stage that trains" in reply.body


@pytest.mark.parametrize(
    ("pipelines", "models", "message"),
    [
        ({"xor": {"path": str(PIPE)}}, {}, "stage 'xor' is model 'xor', which is not in [models]"),
        (
            {"xor": {"path": str(PIPE), "stages": {"xor": {"placement": "thread"}}}},
            {"xor": {"path": str(XOR)}},
            "pipelines.xor.stages.xor: placement: a model stage batches and runs as [models.xor]",
        ),
        (
            {"xor": {"path": str(PIPE), "stages": {"parze": {}}}},
            {"xor": {"path": str(XOR)}},
            "pipelines.xor.stages.parze: the pipeline file defines no stage 'parze' "
            "(stages: parse, xor, label)",
        ),
        (
            {"xor": {"path": "missing.py"}},
            {},
            "pipelines.xor.path: pipeline file missing.py does not exist",
        ),
    ],
)
def test_config_errors_name_the_key(
    pipelines: dict[str, Any], models: dict[str, Any], message: str
) -> None:
    from webtorch.app import App

    cfg = wt_config.from_dict({"models": models, "pipelines": pipelines})
    with pytest.raises(ConfigError) as raised:
        App(cfg)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"pipelines": {"p": {"path": "p.py", "stages": {"s": {"placement": "gpu"}}}}},
            "pipelines.p.stages.s.placement",
        ),
        (
            {"pipelines": {"p": {"path": "p.py", "stages": {"s": {"remote": "nowhere"}}}}},
            "pipelines.p.stages.s.remote: no upstream named 'nowhere'",
        ),
        ({"pipelines": {"p": {"path": "p.py", "max_records": 0}}}, "pipelines.p.max_records"),
        ({"pipelines": {"p": {"path": "p.py", "typo": 1}}}, "pipelines.p.typo"),
        ({"pipelines": {"bad/name": {"path": "p.py"}}}, "invalid pipeline name"),
        (
            {
                "pipelines": {"p": {"path": "p.py"}},
                "routes": [{"path": "/pipelines/p/predict", "return": 200}],
            },
            "is a pipeline's built-in route",
        ),
    ],
)
def test_config_validation_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        wt_config.from_dict(data)
    assert message in str(raised.value)


def test_a_model_stage_batches_and_a_bad_record_fails_alone(tmp_path: Path) -> None:
    from tests.serve.test_server_models import metric, metrics, raw_request, send_together
    from tests.train.test_endpoints import FRAGILE_PY

    (tmp_path / "fragile_model.py").write_text(FRAGILE_PY)
    cfg = wt_config.from_dict(
        {
            "models": {"fragile": {"path": str(tmp_path / "fragile_model.py")}},
            "pipelines": {"f": {"path": str(PIPE.parent / "fragile.py")}},
        }
    )
    with serve_in_thread(cfg) as running:
        before = metrics(running)

        def raw(records: list[str]) -> bytes:
            return raw_request("/pipelines/f/predict", json.dumps(records).encode())

        replies = send_together(running, [raw(["1"]), raw(["2", "-1"]), raw(["3"]), raw(["4"])])
        assert [r.status for r in replies] == [200, 422, 200, 200]
        failed = json.loads(replies[1].body)
        assert failed["stage"] == "fragile" and failed["record"] == 1
        assert "negative input" in failed["error"]
        assert json.loads(replies[3].body)["outputs"] == [{"y": [4.0]}]
        after = metrics(running)
        labels = {"pipeline": "f", "stage": "fragile"}

        def delta(name: str, **extra: str) -> float:
            return metric(after, name, **labels, **extra) - metric(before, name, **labels, **extra)

        # Merged: some batch of the model stage held rows of several requests (then the
        # failing one was rerun request by request, and row by row).
        merged = delta("webtorch_pipeline_stage_batch_rows_count") - delta(
            "webtorch_pipeline_stage_batch_rows_bucket", le="1.0"
        )
        assert merged >= 1


def test_oip_training_through_the_pipeline(server: Running) -> None:
    doc = {
        "id": "t-1",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["0,1", "1,0"]}],
        "targets": [{"name": "y", "datatype": "FP32", "shape": [2, 1], "data": [0, 0]}],
    }
    reply = call(server, "POST", "/v2/pipelines/xor/train", doc)
    assert reply.status == 200, reply.body
    answer = json.loads(reply.body)
    assert answer["pipeline_name"] == "xor" and answer["model_name"] == "xor"
    assert answer["step"] == 1 and answer["id"] == "t-1" and answer["loss"] > 0
    bad = {**doc, "targets": [{"name": "z", "datatype": "FP32", "shape": [2, 1], "data": [0, 0]}]}
    reply = call(server, "POST", "/v2/pipelines/xor/train", bad)
    assert reply.status == 400 and b"unknown target" in reply.body


def test_records_that_cannot_be_a_first_stages_tensors_are_400(tmp_path: Path) -> None:
    cfg = wt_config.from_dict(
        {
            "models": {"xor": {"path": str(XOR)}},
            "pipelines": {"x": {"path": str(PIPE.parent / "xorfirst.py")}},
        }
    )
    with serve_in_thread(cfg) as running:
        good = call(running, "POST", "/pipelines/x/predict", {"records": [[0, 1], [1, 1]]})
        assert good.status == 200, good.body
        assert [round(o["y"][0]) for o in json.loads(good.body)["outputs"]] == [1, 0]
        ragged = call(running, "POST", "/pipelines/x/predict", {"records": [[0, 1], [1]]})
        assert ragged.status == 400
        assert b"cannot be the first stage's tensors" in ragged.body


def test_a_models_preprocess_is_a_stage_run_inside_its_batch(tmp_path: Path) -> None:
    # The one-stage case: a tensors stage as a model's preprocess runs in the model's batch
    # (no queue of its own); the same function as a pipeline stage gets its own queue.
    files = PIPE.parent
    plain = tmp_path / "plain.py"
    plain.write_text(
        (files / "scaled_model.py").read_text().replace("    preprocess=double,\n", "")
    )
    cfg = wt_config.from_dict(
        {
            "models": {
                "scaled": {"path": str(files / "scaled_model.py")},
                "plain": {"path": str(plain)},
            },
            "pipelines": {"scaled": {"path": str(files / "scaled_pipe.py")}},
        }
    )
    with serve_in_thread(cfg) as running:
        direct = call(running, "POST", "/models/scaled/predict", {"inputs": [[1, 2]]})
        assert json.loads(direct.body)["outputs"] == [[2.0, 4.0]]
        piped = call(running, "POST", "/pipelines/scaled/predict", {"records": [{"x": [1, 2]}]})
        assert json.loads(piped.body)["outputs"] == [{"y": [2.0, 4.0]}]


def test_fan_out_to_two_models_and_a_join(tmp_path: Path) -> None:
    cfg = wt_config.from_dict(
        {
            "models": {
                "xor": {"path": str(XOR)},
                "frozen": {"path": str(XOR), "weights": False},
            },
            "pipelines": {"both": {"path": str(PIPE.parent / "fanout.py")}},
        }
    )
    with serve_in_thread(cfg) as running:
        reply = call(running, "POST", "/pipelines/both/predict", {"records": [[0, 1], [1, 1]]})
        assert reply.status == 200, reply.body
        outputs = json.loads(reply.body)["outputs"]
        direct = call(running, "POST", "/models/frozen/predict", {"inputs": [[0, 1], [1, 1]]})
        frozen = [round(row[0], 4) for row in json.loads(direct.body)["outputs"]]
        assert [o["frozen"] for o in outputs] == pytest.approx(frozen, abs=1e-4)
        assert outputs[0]["trained"] > 0.9 and outputs[1]["trained"] < 0.1
        timing = [e.split(";")[0] for e in reply.headers["server-timing"].split(", ")]
        assert timing == ["parse", "trained", "frozen", "compare"]
        meta = json.loads(call(running, "GET", "/v2/pipelines/both").body)
        assert meta["stages"][-1]["after"] == ["trained", "frozen"]
