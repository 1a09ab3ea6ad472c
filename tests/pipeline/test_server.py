"""A pipeline of function stages served over HTTP: the records short form (JSON, text,
multipart, raw bytes), OIP, per-record errors, Server-Timing, metrics and limits."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Running, serve_in_thread
from tests.serve.test_server_models import call, metric, metrics, raw_request, send_together
from webtorch import config as wt_config

FILES = Path(__file__).resolve().parent / "files"
TEXT = FILES / "text.py"


def expected(doc: str) -> int:
    text = doc.strip().lower()
    return len(text) * 10 + len(text.split())


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    cfg = wt_config.from_dict(
        {
            "pipelines": {
                "text": {"path": str(TEXT)},
                "tight": {
                    "path": str(TEXT),
                    "max_records": 4,
                    "max_record_bytes": 10,
                    "stages": {"clean": {"max_queue": 3}},
                },
            }
        }
    )
    with serve_in_thread(cfg) as running:
        yield running


def predict(server: Running, body: Any, content_type: str = "application/json") -> Any:
    data = json.dumps(body).encode() if content_type == "application/json" else body
    return call(server, "POST", "/pipelines/text/predict", data, {"Content-Type": content_type})


def test_json_records_are_answered_in_order(server: Running) -> None:
    docs = ["Hello World ", "a b c", "  Mixed CASE text  "]
    reply = predict(server, {"records": docs})
    assert reply.status == 200, reply.body
    outputs = json.loads(reply.body)["outputs"]
    assert [o["score"] for o in outputs] == [expected(d) for d in docs]
    assert predict(server, docs).body == reply.body  # a bare JSON list is the same


def test_text_plain_is_one_record_and_raw_bytes_are_one(server: Running) -> None:
    reply = predict(server, b"Just Some Text", "text/plain")
    assert json.loads(reply.body)["outputs"][0]["score"] == expected("Just Some Text")
    reply = predict(server, b"raw bytes here", "application/octet-stream")
    assert reply.status == 200
    assert json.loads(reply.body)["outputs"][0]["score"] == expected("raw bytes here")


def test_multipart_parts_are_records(server: Running) -> None:
    boundary = "BoUnDaRy42"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="a"; filename="a.txt"\r\n'
        "Content-Type: text/plain\r\n\r\nFirst File\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nsecond one here\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    reply = predict(server, body, f"multipart/form-data; boundary={boundary}")
    assert reply.status == 200, reply.body
    scores = [o["score"] for o in json.loads(reply.body)["outputs"]]
    assert scores == [expected("First File"), expected("second one here")]


def test_server_timing_has_one_entry_per_stage(server: Running) -> None:
    reply = predict(server, ["x y"])
    entries = [e.strip() for e in reply.headers["server-timing"].split(",")]
    assert [e.split(";")[0] for e in entries] == ["clean", "measure", "score"]
    assert all(float(e.split("dur=")[1]) >= 0 for e in entries)


def test_oip_infer_json_and_binary(server: Running) -> None:
    doc = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["A b", "c"]}]}
    reply = call(server, "POST", "/v2/pipelines/text/infer", doc)
    assert reply.status == 200, reply.body
    outputs = {o["name"]: o for o in json.loads(reply.body)["outputs"]}
    assert outputs["score"]["data"] == [expected("A b"), expected("c")]
    assert outputs["score"]["datatype"] == "INT64" and outputs["score"]["shape"] == [2]
    blob = b"".join(struct.pack("<I", len(t)) + t for t in (b"Hi there", b"x"))
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    reply = call(
        server,
        "POST",
        "/v2/pipelines/text/infer",
        header + blob,
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    assert reply.status == 200, reply.body
    length = int(reply.headers["inference-header-content-length"])
    head = json.loads(reply.body[:length])
    score = next(o for o in head["outputs"] if o["name"] == "score")
    start = length
    for o in head["outputs"]:
        if o["name"] == "score":
            break
        start += o["parameters"]["binary_data_size"]
    values = struct.unpack("<2q", reply.body[start : start + 16])
    assert score["datatype"] == "INT64" and list(values) == [expected("Hi there"), expected("x")]


def test_a_rejected_record_answers_422_naming_stage_and_index(server: Running) -> None:
    reply = predict(server, ["fine", "also fine", "   "])
    assert reply.status == 422
    doc = json.loads(reply.body)
    assert doc["error"] == "stage 'clean' rejected record 2: empty document"
    assert doc["stage"] == "clean" and doc["record"] == 2
    assert reply.headers["server-timing"].startswith("clean;dur=")


def test_bad_records_fail_alone_and_the_rest_of_the_batch_is_answered(server: Running) -> None:
    def raw(records: list[str]) -> bytes:
        return raw_request("/pipelines/text/predict", json.dumps(records).encode())

    # Merged into one batch of clean (the loop is paused while they are sent): one request's
    # record is rejected, another's raises; the others get their own rows back.
    replies = send_together(
        server, [raw(["good one"]), raw(["ok", ""]), raw(["x", "boom"]), raw(["last words"])]
    )
    assert [r.status for r in replies] == [200, 422, 500, 200]
    assert json.loads(replies[0].body)["outputs"][0]["score"] == expected("good one")
    assert json.loads(replies[1].body)["record"] == 1
    failed = json.loads(replies[2].body)
    assert failed["stage"] == "clean" and failed["record"] == 1
    assert "boom in clean" in failed["error"]
    assert json.loads(replies[3].body)["outputs"][0]["score"] == expected("last words")


def test_concurrent_requests_are_batched_and_each_gets_its_rows(server: Running) -> None:
    before = metrics(server)
    docs = [[f"doc {i} " + "w " * i] for i in range(6)]
    replies = send_together(
        server,
        [raw_request("/pipelines/text/predict", json.dumps(d).encode()) for d in docs],
    )
    for reply, doc in zip(replies, docs, strict=True):
        assert reply.status == 200
        output = json.loads(reply.body)["outputs"][0]
        assert output["score"] == expected(doc[0])
    # The score stage saw the batch's rows: each answer reports its batch's size.
    assert max(json.loads(r.body)["outputs"][0]["rows"] for r in replies) > 1
    after = metrics(server)
    batches = metric(
        after, "webtorch_pipeline_stage_batch_rows_count", pipeline="text", stage="clean"
    )
    batches -= metric(
        before, "webtorch_pipeline_stage_batch_rows_count", pipeline="text", stage="clean"
    )
    assert 1 <= batches < len(docs)


def test_metrics_per_stage(server: Running) -> None:
    predict(server, ["one two", "three"])
    samples = metrics(server)
    for stage in ("clean", "measure", "score"):
        labels = {"pipeline": "text", "stage": stage}
        assert metric(samples, "webtorch_pipeline_stage_rows_total", **labels) >= 2
        assert metric(samples, "webtorch_pipeline_stage_seconds_count", **labels) >= 1
        assert metric(samples, "webtorch_pipeline_stage_queue_seconds_count", **labels) >= 1
        assert metric(samples, "webtorch_pipeline_stage_batch_rows_count", **labels) >= 1
        assert (
            "webtorch_pipeline_stage_bytes_total",
            frozenset({**labels, "direction": "in"}.items()),
        ) in samples
    predict(server, [""])
    assert (
        metric(
            samples := metrics(server),
            "webtorch_pipeline_stage_errors_total",
            pipeline="text",
            stage="clean",
        )
        >= 1
    )


def test_metadata_names_stages_and_placements(server: Running) -> None:
    reply = call(server, "GET", "/v2/pipelines/text")
    doc = json.loads(reply.body)
    assert doc["output"] == "score"
    assert [(s["name"], s["takes"], s["placement"], s["runs"]) for s in doc["stages"]] == [
        ("clean", "records", "loop", "here"),
        ("measure", "records", "loop", "here"),
        ("score", "tensors", "loop", "here"),
    ]
    assert doc["stages"][1]["after"] == ["clean"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (["a", "b", "c", "d", "e"], "application/json", 413, "at most 4 (max_records)"),
        (["0123456789x"], "application/json", 413, "record 0 has 11 bytes; at most 10"),
        ([], "application/json", 400, "no records"),
        ({"nope": 1}, "application/json", 400, '"records"'),
        (b"{not json", "application/json", 400, "not valid JSON"),
    ],
)
def test_limits_and_bad_bodies_are_4xx(
    server: Running, body: Any, content_type: str, status: int, message: str
) -> None:
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    reply = call(server, "POST", "/pipelines/tight/predict", data, {"Content-Type": content_type})
    assert reply.status == status, reply.body
    assert message in json.loads(reply.body)["error"]


def test_too_many_multipart_parts_is_413(server: Running) -> None:
    parts = "".join(
        f'--b\r\nContent-Disposition: form-data; name="f{i}"; filename="f"\r\n\r\nx\r\n'
        for i in range(6)
    )
    reply = call(
        server,
        "POST",
        "/pipelines/tight/predict",
        (parts + "--b--\r\n").encode(),
        {"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert reply.status == 413 and b"multipart parts" in reply.body


def test_a_full_stage_queue_answers_503(server: Running) -> None:
    reply = call(server, "POST", "/pipelines/tight/predict", ["a", "b", "c", "d"])
    assert reply.status == 503
    assert json.loads(reply.body)["error"] == "stage 'clean' queue is full"


def test_wrong_method_is_405(server: Running) -> None:
    assert call(server, "GET", "/pipelines/text/predict").status == 405
    assert call(server, "POST", "/v2/pipelines/text").status == 405


def test_the_access_log_records_stage_times(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    cfg = wt_config.from_dict(
        {
            "server": {"access_log": {"path": str(log)}},
            "pipelines": {"text": {"path": str(TEXT)}},
        }
    )
    with serve_in_thread(cfg) as running:
        assert predict(running, ["a b"]).status == 200
    # The server stopped: its access log is flushed and closed.
    line = next(json.loads(raw) for raw in log.read_text().splitlines() if "/pipelines/" in raw)
    assert list(line["stages"]) == ["clean", "measure", "score"]
    assert line["model"] == "text"


def test_the_dashboard_shows_each_stage_in_order(server: Running) -> None:
    assert predict(server, ["a b", "c"]).status == 200
    reply = call(server, "GET", "/dashboard/stats")
    stages = json.loads(reply.body)["pipelines"]["text"]
    assert [s["stage"] for s in stages] == ["clean", "measure", "score"]
    assert all(s["rows"] >= 2 and s["requests"] >= 1 and s["seconds"] > 0 for s in stages)
    page = call(server, "GET", "/dashboard").body
    assert b'id="panel-pipelines"' in page


def _oip(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [
        ("/pipelines/text/predict", b"\xff\xfe", {"Content-Type": "text/plain"}, 400, "UTF-8"),
        (
            "/pipelines/text/predict",
            b"--x\r\n\r\n--x--",
            {"Content-Type": "multipart/form-data"},
            400,
            "boundary",
        ),
        (
            "/pipelines/text/predict",
            b'{"records": "not a list"}',
            {"Content-Type": "application/json"},
            400,
            '"records"',
        ),
        (
            "/v2/pipelines/text/infer",
            _oip({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [300], "data": ["a"]}]}),
            {"Content-Type": "application/json"},
            400,
            "rows",
        ),
        (
            "/v2/pipelines/text/infer",
            _oip({"inputs": [{"name": "t", "datatype": "NOPE", "shape": [1], "data": ["a"]}]}),
            {"Content-Type": "application/json"},
            400,
            "unknown datatype",
        ),
        (
            "/v2/pipelines/text/infer",
            _oip(
                {
                    "inputs": [
                        {"name": f"t{i}", "datatype": "BYTES", "shape": [1], "data": ["a"]}
                        for i in range(65)
                    ]
                }
            ),
            {"Content-Type": "application/json"},
            400,
            "at most 64",
        ),
        (
            "/v2/pipelines/text/infer",
            _oip({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}),
            {"Content-Type": "application/json"},
            400,
            "do not fill shape",
        ),
        (
            "/v2/pipelines/text/infer",
            b"not json",
            {"Content-Type": "application/json"},
            400,
            "not valid JSON",
        ),
        (
            "/v2/pipelines/text/stages/clean/infer",
            b'{"inputs": []}',
            {"Content-Type": "application/octet-stream"},
            400,
            "Inference-Header-Content-Length",
        ),
    ],
)
def test_hostile_bodies_are_4xx_naming_the_problem(
    server: Running, path: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    reply = call(server, "POST", path, body, headers)
    assert reply.status == status, reply.body
    assert message in json.loads(reply.body)["error"]
    assert predict(server, ["still serving"]).status == 200
