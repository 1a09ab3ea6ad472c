"""kill -9 in the middle of concurrent training: no acknowledged example is lost or applied twice.

A real server process trains XOR from several concurrent keep-alive clients, each example unique,
and is killed with SIGKILL while requests are in flight. The log left on disk must hold every
acknowledged example exactly once, in the step its answer named; the restarted server must replay
it; and its weights must equal, bit for bit, those of an independent plain-torch replay of the
logged micro-batches from the starting weights (so a logged batch is applied whole, exactly once,
and nothing unlogged is applied at all).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import XOR, serve_process
from webtorch.examples.xor import XorNet
from webtorch.train.wal import WalRecord, WriteAheadLog, encode_record

CLIENTS = 8


def write_config(tmp_path: Path, state: Path, workers: int = 1, **train: Any) -> Path:
    settings = {"enabled": "true", "max_batch": 16, "durability": '"wal"', **train}
    lines = [
        # workers = 2: worker 0 trains, worker 1 forwards its train requests there.
        f"[server]\nworkers = {workers}",
        "[models.xor]",
        f'path = "{XOR}"',
        "[models.xor.train]",
        f'state_dir = "{state}"',
        *(f"{key} = {value}" for key, value in settings.items()),
    ]
    path = tmp_path / "train.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Trainers:
    """Client threads sending unique examples until the server dies; acknowledged ones are kept
    as (first input value, step)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acked: dict[float, int] = {}
        self.lock = threading.Lock()
        self.enough = threading.Event()
        self.target = 0
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(CLIENTS)]

    def start(self, acks: int) -> None:
        self.target = acks
        for thread in self.threads:
            thread.start()

    def client(self, index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        rng = np.random.default_rng(index)
        n = 0
        try:
            while True:
                n += 1
                # float32-exact and unique per request: the example's identity in the log.
                key = float(np.float32(index + n / 8192))
                other = float(rng.integers(0, 2))
                target = float(rng.integers(0, 2))
                body = json.dumps({"inputs": [[key, other]], "targets": [[target]]})
                conn.request(
                    "POST", "/models/xor/train", body, {"content-type": "application/json"}
                )
                reply = conn.getresponse()
                data = json.loads(reply.read())
                assert reply.status == 200, data
                with self.lock:
                    self.acked[key] = data["step"]
                    if len(self.acked) >= self.target:
                        self.enough.set()
        except (OSError, http.client.HTTPException):
            return  # the server was killed
        finally:
            conn.close()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(30)
            assert not thread.is_alive()


def read_log(directory: Path) -> list[WalRecord]:
    wal = WriteAheadLog(directory)
    try:
        return wal.recover()
    finally:
        wal.close()


def reference(records: list[WalRecord], start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The logged micro-batches applied by a plain torch loop, independent of WebTorch's trainer."""
    net = XorNet()
    net.load_state_dict(start)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)  # as examples/xor.py
    for record in records:
        optimizer.zero_grad()
        out = net(torch.from_numpy(record.tensors["inputs.x"]))
        target = torch.from_numpy(record.tensors["targets.y"])
        # examples/xor.py's loss: BCE per row, the step on their mean.
        loss = torch.nn.functional.binary_cross_entropy(out, target, reduction="none")[:, 0]
        loss.mean().backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return net.state_dict()


def final_weights(state: Path) -> tuple[int, dict[str, torch.Tensor]]:
    newest = max((state / "checkpoints").glob("checkpoint-*.safetensors"))
    tensors = load_file(str(newest))
    step = int(newest.stem.split("-")[1])
    return step, {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


def get_status(url: str) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/models/xor/train")
    reply = conn.getresponse()
    status: dict[str, Any] = json.loads(reply.read())
    conn.close()
    return status


def kill_mid_training(config: Path, acks: int) -> Trainers:
    with serve_process(config) as server:
        trainers = Trainers(server.port)
        trainers.start(acks)
        assert trainers.enough.wait(60), "training did not progress"
        everyone = server.pids()
        # Requests are in flight: clients never stop. Every process at once (with workers: the
        # master and all of them, as a power cut would).
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in everyone):  # the WAL is theirs until they are gone
            assert time.monotonic() < deadline, "killed processes still run"
            time.sleep(0.01)
    trainers.join()
    return trainers


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def check_log(records: list[WalRecord], acked: dict[float, int], first_seq: int) -> None:
    assert [r.seq for r in records] == list(range(first_seq, first_seq + len(records)))
    logged: dict[float, int] = {}
    for record in records:
        keys = record.tensors["inputs.x"][:, 0].tolist()
        assert record.tensors["rows"].sum() == len(keys)
        for key in keys:
            assert key not in logged, f"example {key} logged twice"
            logged[key] = record.seq
    for key, step in acked.items():
        if step >= first_seq:
            assert logged.get(key) == step, f"acknowledged example {key} (step {step}) not logged"


# max_batch 2 with 8 clients: groups of several micro-batches under one fsync. workers = 2:
# the clients' connections spread over two workers, one of which trains.
@pytest.mark.parametrize(
    ("acks", "torn", "max_batch", "workers"),
    [(60, False, 16, 1), (200, True, 2, 1), (500, False, 16, 1), (200, True, 2, 2)],
)
def test_kill_9_loses_no_acknowledged_example(
    tmp_path: Path, acks: int, torn: bool, max_batch: int, workers: int
) -> None:
    state = tmp_path / "state"
    # No periodic checkpoint: the whole history stays in the log, so the reference can replay
    # it from the shipped weights.
    config = write_config(
        tmp_path,
        state,
        workers,
        max_batch=max_batch,
        checkpoint_every_steps=0,
        checkpoint_every_seconds=0,
    )
    trainers = kill_mid_training(config, acks)
    assert len(trainers.acked) >= acks

    copy = tmp_path / "after-crash"
    shutil.copytree(state / "wal", copy)
    records = read_log(copy)
    check_log(records, trainers.acked, 1)
    assert max(trainers.acked.values()) <= records[-1].seq
    if torn:
        # A crash in the middle of a write: half a record at the end of the last segment.
        segment = max((state / "wal").glob("wal-*.log"))
        record = encode_record(records[-1].seq + 1, records[-1].tensors)
        with segment.open("ab") as tail:
            tail.write(record[: len(record) // 2])

    with serve_process(config) as server:
        status = get_status(server.url)
        assert status["step"] == records[-1].seq
        assert status["replayed_steps"] == len(records)
        assert server.stop().returncode == 0  # graceful: writes the final checkpoint
    step, weights = final_weights(state)
    assert step == records[-1].seq
    expected = reference(records, load_file(str(XOR.with_suffix(".safetensors"))))
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


def test_kill_9_with_checkpoints_replays_only_the_tail(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path, state, checkpoint_every_steps=10, checkpoint_every_seconds=0)
    trainers = kill_mid_training(config, 300)

    copy = tmp_path / "after-crash"
    shutil.copytree(state, copy)
    newest = max((copy / "checkpoints").glob("checkpoint-*.safetensors"))
    base = int(newest.stem.split("-")[1])
    assert base > 0, "no periodic checkpoint was written"
    records = [r for r in read_log(copy / "wal") if r.seq > base]
    check_log(records, trainers.acked, base + 1)
    start = {k.removeprefix("model."): v for k, v in load_file(str(newest)).items()}
    start = {k: v for k, v in start.items() if not k.startswith("optim.")}

    with serve_process(config) as server:
        assert get_status(server.url)["step"] == (records[-1].seq if records else base)
        assert server.stop().returncode == 0
    _, weights = final_weights(state)
    expected = reference(records, start)  # plain SGD keeps no optimizer state to restore
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    assert len(list((state / "checkpoints").glob("checkpoint-*"))) <= 2  # old ones pruned
