"""The remote placement over real sockets: a stage server (``webtorch serve --stages``, a child
process) runs the stages, a front sends them their batches. The same pipeline answers the same
in one process and split (outputs, per-record rejections, a stage's failure on a record); a
remote stage that is down or hangs answers 502 / 504 naming the stage, within the group's
timeouts, and the front keeps serving."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import webtorch_harness as harness
from tests.conftest import Running, serve_in_thread
from tests.serve.test_server_models import Reply, call, metric, metrics
from webtorch import config as wt_config
from webtorch.pipeline.wire import decode_stage_batch, encode_stage_batch

TEXT = Path(__file__).resolve().parent / "files" / "text.py"
STAGES = ("clean", "measure", "score")
GROUPS = {"clean": "cleaners", "measure": "measurers", "score": "scorers"}


def split_config(address: str, **group: Any) -> dict[str, Any]:
    """Pipeline ``text`` with every stage on the group at ``address``."""
    return {
        "pipelines": {
            "text": {
                "path": str(TEXT),
                "stages": {s: {"remote": GROUPS[s], "workers": 2} for s in STAGES},
            }
        },
        "upstreams": {
            g: {"servers": [address], "connect_timeout": 2.0, "read_timeout": 10.0, **group}
            for g in GROUPS.values()
        },
    }


def toml(data: dict[str, Any]) -> str:
    """The little TOML split_config needs (tables of scalars and lists), for the child."""
    lines: list[str] = []

    def table(prefix: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items())
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def stage_server() -> Iterator[harness.Server]:
    # Serving its stages, it never calls the groups named in its config: they need not
    # point at it. It listens on a port of its own choosing (a port found free here could be
    # taken before a child binds it).
    text = toml(split_config("127.0.0.1:9"))
    with harness.serve(None, "--stages", ",".join(STAGES), toml=text) as server:
        yield server


@pytest.fixture(scope="module")
def split(stage_server: harness.Server) -> Iterator[Running]:
    cfg = wt_config.from_dict(split_config(f"127.0.0.1:{stage_server.port}"))
    with serve_in_thread(cfg) as running:
        yield running


@pytest.fixture(scope="module")
def local() -> Iterator[Running]:
    cfg = wt_config.from_dict({"pipelines": {"text": {"path": str(TEXT)}}})
    with serve_in_thread(cfg) as running:
        yield running


def predict(server: Running, records: list[Any]) -> Reply:
    return call(server, "POST", "/pipelines/text/predict", {"records": records})


@pytest.mark.parametrize(
    "records",
    [
        ["Hello World ", "a b c", "  Mixed CASE text  "],
        ["fine", "   ", "also fine", ""],  # rejected records: 422 naming stage and record
        ["ok", "boom", "ok too"],  # the stage raises on record 1: 500 naming it
    ],
)
def test_split_answers_as_one_process(split: Running, local: Running, records: list[Any]) -> None:
    here, there = predict(local, records), predict(split, records)
    assert (there.status, json.loads(there.body)) == (here.status, json.loads(here.body))
    timing = there.headers["server-timing"]
    assert "clean;dur=" in timing


def test_split_reports_its_boundaries(split: Running) -> None:
    assert predict(split, ["measure these bytes"] * 3).status == 200
    samples = metrics(split)
    for stage in STAGES:
        for direction in ("in", "out"):
            moved = metric(
                samples,
                "webtorch_pipeline_stage_bytes_total",
                pipeline="text",
                stage=stage,
                direction=direction,
            )
            assert moved > 0, (stage, direction)
        for part in ("serialize", "transfer", "deserialize"):
            count = metric(
                samples, "webtorch_pipeline_remote_seconds_count", pipeline="text", stage=stage,
                part=part,
            )  # fmt: skip
            assert count >= 1, (stage, part)
    described = json.loads(call(split, "GET", "/v2/pipelines/text").body)
    clean = next(s for s in described["stages"] if s["name"] == "clean")
    assert clean["placement"] == "remote" and clean["group"] == "cleaners"


def test_a_down_stage_answers_502_naming_it_quickly(refused_address: str) -> None:
    cfg = wt_config.from_dict(split_config(refused_address))
    with serve_in_thread(cfg) as front:
        for _ in range(2):  # refused, then taken out of rotation: 502 both times
            started = time.monotonic()
            reply = predict(front, ["a", "b"])
            assert time.monotonic() - started < 5.0
            assert reply.status == 502, reply.body
            body = json.loads(reply.body)
            assert body["stage"] == "clean"
            assert "stage 'clean'" in body["error"] and "cleaners" in body["error"]
        assert call(front, "GET", "/v2/health/ready").status == 200  # the front serves on
        samples = metrics(front)
        assert (
            metric(samples, "webtorch_pipeline_stage_errors_total", pipeline="text", stage="clean")
            == 4
        )


@pytest.fixture
def silent() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def test_a_hung_stage_answers_504_within_the_read_timeout(silent: str) -> None:
    cfg = wt_config.from_dict(split_config(silent, read_timeout=0.5))
    with serve_in_thread(cfg) as front:
        started = time.monotonic()
        reply = predict(front, ["x"])
        elapsed = time.monotonic() - started
    assert reply.status == 504, reply.body
    assert "stage 'clean'" in json.loads(reply.body)["error"]
    assert 0.4 < elapsed < 5.0


def test_a_stage_server_says_what_its_side_of_the_wire_cost(stage_server: harness.Server) -> None:
    body, header_length = encode_stage_batch(["Some Text", "more"])
    conn = http.client.HTTPConnection("127.0.0.1", stage_server.port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v2/pipelines/text/stages/clean/infer",
            body,
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(header_length),
            },
        )
        answer = conn.getresponse()
        raw = answer.read()
        timing = ", ".join(v for k, v in answer.getheaders() if k.lower() == "server-timing")
    finally:
        conn.close()
    assert answer.status == 200
    rows, count = decode_stage_batch(
        raw, answer.getheader("inference-header-content-length", "").encode(), 2, "outputs"
    )
    assert (rows, count) == (["some text", "more"], 2)
    names = [entry.split(";")[0].strip() for entry in timing.split(",")]
    assert {"decode", "encode", "clean"} <= set(names)


def test_the_group_balances_and_retries_past_a_dead_server(
    stage_server: harness.Server, refused_address: str
) -> None:
    dead = refused_address
    live = f"127.0.0.1:{stage_server.port}"
    data = split_config(live, policy="round_robin")
    for group in data["upstreams"].values():
        group["servers"] = [dead, live]
    with serve_in_thread(wt_config.from_dict(data)) as front:
        for _ in range(4):  # whichever server the policy picks first, every answer is whole
            reply = predict(front, ["Hello World ", "x"])
            assert reply.status == 200, reply.body
        samples = metrics(front)
    failed = metric(
        samples,
        "webtorch_upstream_failures_total",
        group="cleaners",
        upstream=dead,
        outcome="connect_failed",
    )
    assert failed >= 1  # it was tried, failed over, and (max_fails = 1) left out after
