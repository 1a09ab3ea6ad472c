"""One stage on its own: the stage wire form (both sides), a stage's endpoint, and
``webtorch serve --stages`` (a stage server: only the named stages and the models they need)."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import XOR, serve_in_thread, serve_process
from tests.pipeline.test_models import PIPE
from tests.pipeline.test_server import TEXT
from webtorch import config as wt_config
from webtorch.app import App
from webtorch.errors import ConfigError
from webtorch.pipeline.batch import Joined
from webtorch.pipeline.spec import Reject
from webtorch.pipeline.wire import decode_stage_batch, encode_stage_batch, stage_response


def roundtrip(batch: Any) -> Any:
    body, length = encode_stage_batch(batch)
    decoded, rows = decode_stage_batch(body, str(length).encode(), 1000)
    return decoded, rows


def test_records_cross_the_wire_as_they_are() -> None:
    records = [b"\x00raw", "text \u00e9", {"k": [1, 2]}, 7, Reject("bad one")]
    decoded, rows = roundtrip(records)
    assert rows == 5 and decoded == records


def test_columns_cross_with_their_datatypes() -> None:
    batch = {"x": np.arange(6, dtype=np.float32).reshape(3, 2), "names": ["a", "b", "c"]}
    decoded, rows = roundtrip(batch)
    assert rows == 3 and decoded["x"].dtype == np.float32
    assert decoded["x"].tolist() == batch["x"].tolist() and decoded["names"] == ["a", "b", "c"]


def test_a_join_crosses_per_input() -> None:
    batch = Joined({"left": ["a", "b"], "right": {"v": np.array([1, 2], dtype=np.int64)}})
    decoded, _ = roundtrip(batch)
    assert isinstance(decoded, Joined) and decoded["left"] == ["a", "b"]
    assert decoded["right"]["v"].tolist() == [1, 2]


def test_a_stage_answer_reads_back() -> None:
    response = stage_response(["x", Reject("no")])
    header = dict(response.headers)[b"inference-header-content-length"]
    decoded, _ = decode_stage_batch(response.body, header, 10, key="outputs")
    assert decoded == ["x", Reject("no")]


def test_malformed_stage_bodies_are_400() -> None:
    from webtorch.errors import BadRequest

    body, length = encode_stage_batch(["a"])
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
        decode_stage_batch(body, None, 10)
    with pytest.raises(BadRequest, match="rows"):
        decode_stage_batch(body, str(length).encode(), 0)
    doctored = body.replace(b'"form":"records"', b'"form":"pickle!"')
    with pytest.raises(BadRequest, match="unknown stage batch form"):
        decode_stage_batch(doctored, str(length).encode(), 10)


def post_stage(host: str, port: int, path: str, batch: Any) -> tuple[int, Any]:
    body, length = encode_stage_batch(batch)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(
            "POST",
            path,
            body,
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(length),
            },
        )
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            return resp.status, json.loads(data)
        header = resp.getheader("inference-header-content-length")
        assert header is not None
        return 200, decode_stage_batch(data, header.encode(), 1000, key="outputs")[0]
    finally:
        conn.close()


def test_a_stage_endpoint_answers_rows_and_keeps_rejects_as_rows() -> None:
    cfg = wt_config.from_dict({"pipelines": {"text": {"path": str(TEXT)}}})
    with serve_in_thread(cfg) as running:
        status, rows = post_stage(
            running.host, running.port, "/v2/pipelines/text/stages/clean/infer", ["  A B ", ""]
        )
        assert status == 200 and rows == ["a b", Reject("empty document")]
        status, columns = post_stage(
            running.host,
            running.port,
            "/v2/pipelines/text/stages/score/infer",
            {"length": np.array([3]), "words": np.array([2])},
        )
        assert status == 200 and columns["score"].tolist() == [32]
        status, error = post_stage(
            running.host, running.port, "/v2/pipelines/text/stages/clean/infer", ["boom"]
        )
        assert status == 500 and error["stage"] == "clean"


def test_stages_serves_only_the_named_stages_and_their_models(tmp_path: Path) -> None:
    cfg = wt_config.from_dict(
        {"models": {"xor": {"path": str(XOR)}}, "pipelines": {"xor": {"path": str(PIPE)}}}
    )
    assert App(cfg, stages={"parse"}).models == {}  # the xor model is not needed here
    assert set(App(cfg, stages={"xor"}).models) == {"xor"}
    with pytest.raises(ConfigError, match="--stages: no pipeline has stage"):
        App(cfg, stages={"nope"})


def test_serve_stages_from_the_command_line(tmp_path: Path) -> None:
    toml = f'[pipelines.text]\npath = "{TEXT}"\n[pipelines.text.stages.measure]\nworkers = 2\n'
    (tmp_path / "p.toml").write_text(toml)
    with serve_process(tmp_path / "p.toml", "--stages", "measure") as server:
        host, port = server.host, server.port
        assert port is not None
        meta = _get(host, port, "/v2/pipelines/text")
        assert [(s["name"], s["runs"]) for s in meta["stages"]] == [
            ("clean", "elsewhere"),
            ("measure", "here"),
            ("score", "elsewhere"),
        ]
        status, rows = post_stage(host, port, "/v2/pipelines/text/stages/measure/infer", ["a b"])
        assert status == 200 and rows[0]["words"] == 2
        status, _ = post_stage(host, port, "/v2/pipelines/text/stages/clean/infer", ["a"])
        assert status == 404
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("POST", "/pipelines/text/predict", b'["a"]')
        assert conn.getresponse().status == 404


def _get(host: str, port: int, path: str) -> Any:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_check_lists_each_pipelines_stages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from webtorch import cli

    toml = (
        f'[models.xor]\npath = "{XOR}"\n[pipelines.xor]\npath = "{PIPE}"\n'
        '[pipelines.xor.stages.parse]\nplacement = "process"\n'
    )
    (tmp_path / "p.toml").write_text(toml)
    assert cli.main(["check", str(tmp_path / "p.toml")]) == 0
    out = capsys.readouterr().out
    assert "pipeline xor: parse (records, process) -> xor (tensors, model xor) -> label" in out
    (tmp_path / "bad.toml").write_text(toml.replace("parse]", "parze]"))
    assert cli.main(["check", str(tmp_path / "bad.toml")]) == 2
    assert "pipelines.xor.stages.parze" in capsys.readouterr().err
