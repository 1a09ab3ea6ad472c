"""Training with ``server.workers = 2`` as processes (issue 22 part 2): worker 0 trains, worker 1
forwards its train requests there and serves the weights worker 0 publishes, as numbered
versions (``webtorch-model-version``). One step sequence, one WAL, replayed bit for bit; no
answer from a torn or mixed set of weights; kill -9 of any process loses no acknowledged
example. Which worker answers is read from /metrics on the same keep-alive connection; every
wait polls a condition against a deadline."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import webtorch_harness as harness
from tests.conftest import XOR
from tests.train.test_crash import check_log, final_weights, read_log, reference
from tests.workers.test_workers import TIMEOUT, alive, one_per_worker, pids, poll, worker_of
from webtorch_harness import Server

VERSION = "webtorch-model-version"
JSON = {"content-type": "application/json"}

# A model whose every weight is the number of steps it took: each step adds exactly 1 to all
# 65,536 of them (SGD, lr 1, the gradient of -sum(w) is -1), and a prediction answers (min, max,
# sum). An answer from weights copied while they were written would show min != max; its
# version header must be that number.
COUNTER_PY = """
import torch
from torch import nn
import webtorch


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(65536))

    def forward(self, x):
        w = self.w
        row = torch.stack([w.min(), w.max(), w.sum()])
        return row.expand(x.shape[0], 3) + 0 * x


model = webtorch.Model(
    network=Counter,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 1))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 3))],
    loss=lambda out, tgt: -out["y"][:, 2],
    optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
)
"""


def config(model: Path, state: Path, *, max_batch: int = 16, restart_delay: float = 0.05) -> str:
    return f"""
[server]
listen = "127.0.0.1:0"
workers = 2

[server.master]
restart_delay = {restart_delay}

[models.m]
path = "{model}"
max_batch = 64

[models.m.train]
enabled = true
durability = "wal"
state_dir = "{state}"
max_batch = {max_batch}
checkpoint_every_steps = 0
checkpoint_every_seconds = 0
"""


def post(
    conn: http.client.HTTPConnection, path: str, body: Any, **headers: str
) -> tuple[int, dict[str, str], Any]:
    conn.request("POST", path, json.dumps(body), {**JSON, **headers})
    reply = conn.getresponse()
    data = reply.read()
    return reply.status, {k.lower(): v for k, v in reply.getheaders()}, json.loads(data)


@contextmanager
def spread(server: Server, per_worker: int) -> Iterator[list[http.client.HTTPConnection]]:
    """``per_worker`` keep-alive connections to each of the two workers."""
    with ExitStack() as stack:
        slots = pids(server)
        conns = [
            stack.enter_context(one_per_worker(server, {pid}))[pid]
            for pid in slots.values()
            for _ in range(per_worker)
        ]
        yield conns


def test_training_from_many_connections_on_two_workers_is_one_step_sequence(
    tmp_path: Path,
) -> None:
    """Unique XOR examples from 8 connections, 4 on each worker: one step sequence (every
    answer's step is a step of the one WAL, which holds each acknowledged example once, in the
    step its answer named), replayed bit for bit; both workers then predict with the final
    version, the same numbers, and XOR right."""
    state = tmp_path / "state"
    toml = config(XOR, state).replace("[models.m", "[models.xor")
    acked: dict[float, int] = {}
    by_worker: dict[int, int] = {}
    lock = threading.Lock()
    failures: list[str] = []
    with harness.serve(toml=toml, workdir=tmp_path) as server:
        with spread(server, 4) as conns:

            def client(index: int, conn: http.client.HTTPConnection) -> None:
                pid = worker_of(conn)
                for n in range(1, 31):
                    a, b = n % 2, (n // 2) % 2
                    # float32-exact and unique: the example's identity in the log.
                    key = a + (index * 64 + n) / 2**14
                    answer = post(
                        conn,
                        "/models/xor/train",
                        {"inputs": [[key, b]], "targets": [[float(a ^ b)]]},
                    )
                    if answer[0] != 200:
                        failures.append(repr(answer))
                        return
                    with lock:
                        acked[key] = answer[2]["step"]
                        by_worker[pid] = by_worker.get(pid, 0) + 1

            threads = [threading.Thread(target=client, args=(i, c)) for i, c in enumerate(conns)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(TIMEOUT)
            assert failures == []
            assert len(acked) == 8 * 30 and len(by_worker) == 2
            last = status_of_model(conns[0], "xor")["step"]
            assert (
                status_of_model(conns[-1], "xor")["step"] == last
            )  # the same trainer, asked from both
            predictions = set()
            for conn in (conns[0], conns[-1]):
                points = [[0, 0], [0, 1], [1, 0], [1, 1]]
                code, headers, body = post(conn, "/models/xor/predict", {"inputs": points})
                assert code == 200 and int(headers[VERSION]) == last
                assert [round(y[0]) for y in body["outputs"]] == [0, 1, 1, 0]
                predictions.add(json.dumps(body))
            assert len(predictions) == 1
        assert server.stop().returncode == 0
    records = read_log(state / "wal")
    check_log(records, acked, 1)
    assert records[-1].seq == last == max(acked.values())
    step, weights = final_weights(state)
    assert step == last
    expected = reference(records, load_file(str(XOR.with_suffix(".safetensors"))))
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


def test_the_other_worker_predicts_with_each_new_version_whole(tmp_path: Path) -> None:
    """While worker 0 trains, worker 1's answers carry versions that only go up, each answer
    exactly its version's weights (min = max = version: never a torn copy, never two versions
    in one answer); a train answer's step is published before it is sent, so worker 1 predicts
    with it (or newer) from then on."""
    model = tmp_path / "counter.py"
    model.write_text(COUNTER_PY)
    toml = config(model, tmp_path / "state", max_batch=4)
    steps = 30
    failures: list[str] = []
    seen: list[int] = []
    done = threading.Event()
    with harness.serve(toml=toml, workdir=tmp_path) as server:
        slots = pids(server)
        with ExitStack() as stack:
            trainer = stack.enter_context(one_per_worker(server, {slots[0]}))[slots[0]]
            readers = [
                stack.enter_context(one_per_worker(server, {slots[1]}))[slots[1]] for _ in range(3)
            ]

            def predict(conn: http.client.HTTPConnection) -> None:
                previous = -1
                while not done.is_set():
                    code, headers, body = post(conn, "/models/m/predict", {"inputs": [[0]] * 8})
                    version = int(headers.get(VERSION, -2))
                    rows = {tuple(row) for row in body.get("outputs", [])}
                    low, high, total = next(iter(rows)) if len(rows) == 1 else (-1, -2, 0)
                    if code != 200 or not (low == high == version and total == 65536 * low):
                        failures.append(f"{code} {headers.get(VERSION)} {body}")
                        return
                    if version < previous:
                        failures.append(f"version {version} after {previous}")
                        return
                    previous = version
                    seen.append(version)

            follower = readers.pop()
            threads = [threading.Thread(target=predict, args=(c,)) for c in readers]
            for thread in threads:
                thread.start()
            try:
                for n in range(steps):
                    code, _, body = post(
                        trainer, "/models/m/train", {"inputs": [[0]], "targets": [[0, 0, 0]]}
                    )
                    assert code == 200 and body["step"] == n + 1, body
                    # Published before it was answered: worker 1 predicts with it from now on.
                    code, headers, _ = post(follower, "/models/m/predict", {"inputs": [[0]]})
                    assert code == 200 and int(headers[VERSION]) >= n + 1
            finally:
                done.set()
                for thread in threads:
                    thread.join(TIMEOUT)
            assert failures == []
            assert len(set(seen)) > 1, "the other worker saw no new version"

            def latest() -> int | None:
                code, headers, _ = post(readers[0], "/models/m/predict", {"inputs": [[0]]})
                assert code == 200
                return int(headers[VERSION]) if int(headers[VERSION]) == steps else None

            poll(latest, f"worker 1 at version {steps}")


def kill_under_load(tmp_path: Path, state: Path, victim: str) -> dict[float, int]:
    """Train XOR from connections on both workers; kill -9 ``victim`` ("all": every process at
    once, a power cut; "master") while requests are in flight. The acknowledged examples."""
    toml = config(XOR, state, max_batch=4).replace("[models.m", "[models.xor")
    acked: dict[float, int] = {}
    lock = threading.Lock()
    enough = threading.Event()
    with harness.serve(toml=toml, workdir=tmp_path) as server, spread(server, 3) as conns:

        def client(index: int, conn: http.client.HTTPConnection) -> None:
            n = 0
            try:
                while True:
                    n += 1
                    key = float(index + n / 8192)
                    code, _, body = post(
                        conn, "/models/xor/train", {"inputs": [[key, 1]], "targets": [[1]]}
                    )
                    if code != 200:
                        return  # 502/503 while dying: not acknowledged
                    with lock:
                        acked[key] = body["step"]
                        if len(acked) >= 150:
                            enough.set()
            except (OSError, http.client.HTTPException, ValueError):
                return  # killed

        threads = [threading.Thread(target=client, args=(i, c)) for i, c in enumerate(conns)]
        for thread in threads:
            thread.start()
        assert enough.wait(TIMEOUT), "training did not progress"
        everyone = server.pids()
        if victim == "all":
            os.killpg(server.pid, signal.SIGKILL)
        else:
            server.send(signal.SIGKILL)
        poll(lambda: not any(alive(p) for p in everyone) or None, "every process gone")
        for thread in threads:
            thread.join(TIMEOUT)
    return acked


@pytest.mark.parametrize("victim", ["all", "master"])
def test_kill_9_with_two_workers_loses_no_acknowledged_example(tmp_path: Path, victim: str) -> None:
    """The crash test of tests/train/test_crash.py with workers = 2: every process killed at
    once (the log is then replayed bit for bit), or the master alone (its workers drain: the
    trainer answers what it took and writes a final checkpoint)."""
    state = tmp_path / "state"
    acked = kill_under_load(tmp_path, state, victim)
    if victim == "all":
        copy = tmp_path / "after-crash"
        shutil.copytree(state / "wal", copy)
        records = read_log(copy)
        check_log(records, acked, 1)
        last = records[-1].seq
        assert max(acked.values()) <= last
    else:
        last = max(acked.values())
    toml = config(XOR, state, max_batch=4).replace("[models.m", "[models.xor")
    with harness.serve(toml=toml, workdir=tmp_path) as server:
        with one_per_worker(server, {pids(server)[1]}) as conns:
            status = status_of_model(next(iter(conns.values())), "xor")
        if victim == "all":
            assert status["step"] == last and status["replayed_steps"] == len(records)
        else:
            assert status["step"] >= last
        assert server.stop().returncode == 0
    if victim == "all":
        step, weights = final_weights(state)
        assert step == last
        expected = reference(records, load_file(str(XOR.with_suffix(".safetensors"))))
        for name, tensor in expected.items():
            assert torch.equal(weights[name], tensor), name


def status_of_model(conn: http.client.HTTPConnection, model: str) -> dict[str, Any]:
    conn.request("GET", f"/models/{model}/train")
    reply = conn.getresponse()
    data: dict[str, Any] = json.loads(reply.read())
    assert reply.status == 200, data
    return data


def test_a_killed_trainer_worker_recovers_from_its_wal_and_the_other_waits_with_503(
    tmp_path: Path,
) -> None:
    """kill -9 of worker 0 (the trainer): worker 1 answers train requests 503 with Retry-After
    (never a 200 for an example no log holds) and keeps predicting; the master starts worker 0
    again, it replays its WAL, and training goes on at the next step, every acknowledged example
    in the log."""
    state = tmp_path / "state"
    # A second before the restart: a window in which worker 1 has no trainer to reach.
    toml = config(XOR, state, restart_delay=1.0).replace("[models.m", "[models.xor")
    acked: dict[float, int] = {}
    with harness.serve(toml=toml, workdir=tmp_path) as server:
        slots = pids(server)
        with one_per_worker(server, {slots[1]}) as conns:
            conn = conns[slots[1]]
            n = [0]

            def train() -> tuple[int, dict[str, str], Any]:
                n[0] += 1
                key = float(1 + n[0] / 8192)
                answer = post(conn, "/models/xor/train", {"inputs": [[key, 0]], "targets": [[1]]})
                if answer[0] == 200:
                    acked[key] = answer[2]["step"]
                return answer

            for _ in range(10):
                assert train()[0] == 200
            before = max(acked.values())
            after = server.log_size()
            os.kill(slots[0], signal.SIGKILL)

            def refused() -> bool | None:
                code, headers, body = train()
                if code in (200, 502):
                    # Not dead yet as seen from here; or the connection it had to worker 0
                    # broke under the request (unknown outcome, not acknowledged).
                    return None
                assert code == 503 and headers["retry-after"] == "1", (code, body)
                assert "trainer (worker 0) is starting" in body["error"]
                return True

            poll(refused, "a 503 while worker 0 is away")
            # Predictions go on meanwhile, with the last version.
            code, headers, _ = post(conn, "/models/xor/predict", {"inputs": [[1, 0]]})
            assert code == 200 and int(headers[VERSION]) == before
            server.wait_log(r"worker 0: pid \d+ \(restarted\)", TIMEOUT, after)

            def trained() -> int | None:
                code, headers, body = train()
                if code == 503:
                    assert headers["retry-after"] == "1"
                    return None
                assert code == 200, body
                step: int = body["step"]
                return step

            assert poll(trained, "training again") == before + 1
            status = status_of_model(conn, "xor")
            assert status["replayed_steps"] == before and status["step"] == before + 1
            code, headers, _ = post(conn, "/models/xor/predict", {"inputs": [[1, 0]]})
            assert code == 200 and int(headers[VERSION]) == before + 1
        assert server.stop().returncode == 0
    step, _ = final_weights(state)
    assert step == before + 1
    assert sorted(acked.values()) == list(range(1, before + 2))


def test_a_forwarded_train_request_is_checked_where_it_arrives_and_keeps_its_key(
    tmp_path: Path,
) -> None:
    """Worker 1 checks a train request as worker 0 would (token, CSRF) before forwarding it; an
    Idempotency-Key holds across workers (the trainer keeps the keys); the status is the
    trainer's, asked from either."""
    toml = config(XOR, tmp_path / "state").replace("[models.m", "[models.xor")
    toml = toml.replace("workers = 2\n", 'workers = 2\ntoken = "s3cret-s3cret-s3cret"\n')
    token = {"authorization": "Bearer s3cret-s3cret-s3cret"}
    example = {"inputs": [[0.25, 1]], "targets": [[1]]}
    with harness.serve(toml=toml, workdir=tmp_path) as server:
        slots = pids(server)
        with ExitStack() as stack:
            trainer = stack.enter_context(one_per_worker(server, {slots[0]}))[slots[0]]
            other = stack.enter_context(one_per_worker(server, {slots[1]}))[slots[1]]
            code, _, body = post(other, "/models/xor/train", example)
            assert code == 401, body
            code, _, body = post(
                other, "/models/xor/train", example, origin="https://evil.example", **token
            )
            assert code == 403, body
            other.request(
                "POST",
                "/models/xor/train",
                json.dumps(example),
                {"content-type": "text/plain", **token},
            )
            reply = other.getresponse()
            assert reply.status == 415, reply.read()
            reply.read()
            key = {"idempotency-key": "one-example", **token}
            first = post(other, "/models/xor/train", example, **key)
            assert first[0] == 200 and first[2]["step"] == 1
            again = post(trainer, "/models/xor/train", example, **key)
            assert again[0] == 200 and again[2] == first[2]  # answered as then, not applied
            other.request("GET", "/models/xor/train", headers=token)
            reply = other.getresponse()
            status = json.loads(reply.read())
            assert reply.status == 200 and status["step"] == 1 and status["examples"] == 1


def test_training_through_a_pipeline_reaches_the_trainer_from_either_worker(
    tmp_path: Path,
) -> None:
    """A pipeline's train request that reaches the worker that does not train its model stage
    is forwarded whole: the trainer runs the same stages (parse) before the step, so both
    workers' requests land in one step sequence."""
    pipe = Path(__file__).parent.parent / "pipeline" / "files" / "xorpipe.py"
    toml = config(XOR, tmp_path / "state").replace("[models.m", "[models.xor")
    toml += f'\n[pipelines.xor]\npath = "{pipe}"\n'
    example = {"records": ["0.25,1", "1,1"], "targets": [[1], [0]]}
    with harness.serve(toml=toml, workdir=tmp_path) as server:
        slots = pids(server)
        steps = []
        with ExitStack() as stack:
            for pid in slots.values():
                conn = stack.enter_context(one_per_worker(server, {pid}))[pid]
                code, _, body = post(conn, "/pipelines/xor/train", example)
                assert code == 200, body
                steps.append(body["step"])
                code, _, body = post(
                    conn, "/pipelines/xor/train", {"records": ["oops"], "targets": [[1]]}
                )
                assert code == 422 and "parse" in body["error"], body
        assert sorted(steps) == [1, 2]
