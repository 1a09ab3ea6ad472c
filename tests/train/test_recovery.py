"""What a restart brings back (issue 19, items 8-10 and the idempotency key of item 9).

- The counters: ``step`` (optimizer steps: a micro-batch whose every example was refused takes
  none) and ``examples`` come back from the checkpoint plus what the WAL replay adds.
- ``keep_checkpoints = 2`` is a real fallback: the WAL is kept from the oldest kept checkpoint
  on, so with the newest one damaged, the older one plus the replay reach the same state.
- A train request with an ``Idempotency-Key`` is applied once: a retry, during the request,
  after it or after a restart, gets the first answer.
- A WAL damaged in the middle of its newest segment stops the start and is left as it was.
"""

from __future__ import annotations

import socket
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from tests.conftest import serve_in_thread
from tests.serve.test_server_models import Reply, call, predict, read_reply, send_together
from tests.train.test_endpoints import FRAGILE_PY, train, train_config
from webtorch.app import App
from webtorch.config import TrainConfig
from webtorch.errors import ModelLoadError
from webtorch.serve.model import load_model
from webtorch.train.batch import StepResult
from webtorch.train.trainer import Trainer
from webtorch.train.wal import delete_segments

# --- the trainer driven as the executor drives it: log, step, checkpoint ---


def fragile_trainer(tmp_path: Path, **settings: Any) -> Trainer:
    path = tmp_path / "fragile.py"
    path.write_text(FRAGILE_PY)
    cfg = TrainConfig(enabled=True, checkpoint_every_steps=0, checkpoint_every_seconds=0)
    trainer = Trainer(load_model("fragile", path), cfg.model_copy(update=settings), tmp_path / "s")
    trainer.recover()
    return trainer


def step(trainer: Trainer, *values: float, keys: list[str | None] | None = None) -> StepResult:
    """One micro-batch of one request per value (fragile refuses a negative one), logged and
    fsynced before it is applied."""
    requests = [
        ({"x": np.array([[v]], dtype=np.float32)}, {"y": np.array([[0.5]], dtype=np.float32)})
        for v in values
    ]
    batch = trainer.batch(requests, [1] * len(values), keys)  # type: ignore[arg-type]
    trainer.log([(batch.seq, trainer.encode(batch))])
    return trainer.train_step(batch)


def checkpoint(trainer: Trainer) -> None:
    seq, snap = trainer.snapshot()
    delete_segments(trainer.forget_logged(trainer.write_checkpoint(seq, snap)))
    trainer.checkpointing = False


def state(trainer: Trainer) -> tuple[int, int, float]:
    status = trainer.status()
    return status["step"], status["examples"], float(trainer.model.network.scale.detach())


def damage(checkpoint_file: Path) -> None:
    data = bytearray(checkpoint_file.read_bytes())
    data[-2] ^= 0x40  # tensor data: the header still parses, the checksum does not match
    checkpoint_file.write_bytes(bytes(data))


def test_refused_micro_batches_take_no_step(tmp_path: Path) -> None:
    trainer = fragile_trainer(tmp_path)
    assert step(trainer, 1.0).step == 1
    refused = step(trainer, -1.0, -2.0)
    assert refused.losses == [None, None] and refused.step == 1
    assert trainer.status()["step"] == 1  # was 2: a step that applied nothing
    assert step(trainer, 2.0, -3.0).step == 2  # one good example: one optimizer step
    assert state(trainer)[:2] == (2, 2)
    trainer.close()
    again = fragile_trainer(tmp_path)  # replayed from the WAL: the same decisions
    assert state(again)[:2] == (2, 2) and again.stats.replayed == 3


def test_counters_come_back_from_the_checkpoint_plus_the_replay(tmp_path: Path) -> None:
    trainer = fragile_trainer(tmp_path)
    for value in (1.0, 2.0, -1.0, 3.0):
        step(trainer, value)
    checkpoint(trainer)
    step(trainer, 0.5, 0.25)
    expected = state(trainer)
    assert expected[:2] == (4, 5)
    trainer.close()
    again = fragile_trainer(tmp_path)
    assert again.stats.replayed == 1  # the rest came from the checkpoint
    assert state(again) == expected  # examples was 2: only what the replay counted


def test_keep_checkpoints_2_falls_back_to_the_older_one(tmp_path: Path) -> None:
    trainer = fragile_trainer(tmp_path, keep_checkpoints=2)
    for i in range(1, 11):
        step(trainer, i / 8)
        if i in (3, 6, 8):  # 9 and 10 are only in the log
            checkpoint(trainer)
    expected = state(trainer)
    trainer.close()
    checkpoints = sorted((tmp_path / "s" / "checkpoints").glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == [
        "checkpoint-0000000000000006.safetensors",
        "checkpoint-0000000000000008.safetensors",
    ]

    damage(checkpoints[-1])
    again = fragile_trainer(tmp_path, keep_checkpoints=2)
    # Loaded the checkpoint at 6 and replayed 7-10: the WAL after it was kept.
    assert again.stats.replayed == 4
    assert state(again) == expected

    # The damaged one is set aside, so it does not take a kept fallback's place: after the next
    # checkpoint, the one at 6 is still a fallback with its WAL.
    assert sorted(p.name for p in (tmp_path / "s" / "checkpoints").iterdir()) == [
        "checkpoint-0000000000000006.safetensors",
        "checkpoint-0000000000000008.safetensors.damaged",
    ]
    step(again, 1.5)
    checkpoint(again)
    step(again, 1.625)
    expected = state(again)
    again.close()
    damage(tmp_path / "s" / "checkpoints" / "checkpoint-0000000000000011.safetensors")
    third = fragile_trainer(tmp_path, keep_checkpoints=2)
    assert third.stats.replayed == 6 and state(third) == expected


def test_the_whole_log_is_kept_until_keep_checkpoints_exist(tmp_path: Path) -> None:
    # One checkpoint and keep_checkpoints = 2: the fallback is the initial weights.
    trainer = fragile_trainer(tmp_path, keep_checkpoints=2)
    for value in (1.0, 2.0):
        step(trainer, value)
    checkpoint(trainer)
    step(trainer, 3.0)
    expected = state(trainer)
    trainer.close()
    (only,) = (tmp_path / "s" / "checkpoints").glob("checkpoint-*")
    damage(only)
    again = fragile_trainer(tmp_path, keep_checkpoints=2)
    assert again.stats.replayed == 3 and state(again) == expected


def test_idempotency_keys_come_back_from_the_wal_and_the_checkpoint(tmp_path: Path) -> None:
    trainer = fragile_trainer(tmp_path, idempotency_keys=3)
    first = step(trainer, 1.0, -1.0, 2.0, keys=["a", "b", None])
    assert trainer.answered("a") == (1, first.losses[0], None)
    b = trainer.answered("b")
    assert b is not None and b[1] is None and "negative input" in (b[2] or "")
    step(trainer, 3.0, keys=["c"])
    trainer.close()

    again = fragile_trainer(tmp_path, idempotency_keys=3)  # from the WAL
    assert again.answered("a") == (1, first.losses[0], None)
    assert again.answered("b") == b and again.answered("c") is not None
    checkpoint(again)
    step(again, 4.0, keys=["d"])  # the oldest key, "a", is forgotten: at most 3
    assert again.answered("a") is None
    again.close()

    third = fragile_trainer(tmp_path, idempotency_keys=3)  # checkpoint + WAL
    assert third.answered("a") is None
    assert [k for k in "bcd" if third.answered(k) is not None] == ["b", "c", "d"]
    assert third.answered("b") == b


# --- over HTTP ---


def keyed(path: str, body: bytes, key: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Idempotency-Key: {key}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def send(running: Any, raw: bytes) -> Reply:
    with socket.create_connection((running.host, running.port), timeout=30) as sock:
        sock.sendall(raw)
        return read_reply(sock)


def status(running: Any, model: str = "xor") -> tuple[int, int]:
    reply = call(running, "GET", f"/models/{model}/train").json()
    return reply["step"], reply["examples"]


def test_a_retried_key_is_answered_once_and_applied_once(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, max_batch=1)
    body = b'{"inputs": [[0, 1]], "targets": [[1]]}'
    with serve_in_thread(cfg) as running:
        # Three copies of one request at once, and a retry after: one example is applied.
        replies = send_together(running, [keyed("/models/xor/train", body, "k-1")] * 3)
        assert [r.status for r in replies] == [200] * 3, replies
        assert len({r.body for r in replies}) == 1
        first = replies[0].json()
        assert first["step"] == 1
        assert send(running, keyed("/models/xor/train", body, "k-1")).json() == first
        assert status(running) == (1, 1)
        other = send(running, keyed("/models/xor/train", body, "k-2")).json()
        assert other["step"] == 2
        oip = b'{"id": "r7", "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", '
        oip += b'"data": [0, 1]}], "targets": [{"name": "y", "shape": [1, 1], '
        oip += b'"datatype": "FP32", "data": [1]}]}'
        answer = send(running, keyed("/v2/models/xor/train", oip, "k-1")).json()
        assert (answer["loss"], answer["step"], answer["id"]) == (first["loss"], 1, "r7")
        assert status(running) == (2, 2)
        weights = predict(running, "xor", [[0, 1]]).json()
    with serve_in_thread(cfg) as running:  # remembered across a restart
        assert send(running, keyed("/models/xor/train", body, "k-1")).json() == first
        assert send(running, keyed("/models/xor/train", body, "k-2")).json() == other
        assert status(running) == (2, 2)
        assert predict(running, "xor", [[0, 1]]).json() == weights


def test_a_refused_keyed_example_is_refused_again(tmp_path: Path) -> None:
    with serve_in_thread(train_config(tmp_path)) as running:
        raw = keyed("/models/fragile/train", b'{"inputs": [[-1]], "targets": [[0]]}', "neg")
        first = send(running, raw)
        assert first.status == 422 and "negative input" in first.json()["error"]
        again = send(running, raw)
        assert (again.status, again.body) == (422, first.body)
        assert status(running, "fragile") == (0, 0)


@pytest.mark.parametrize(
    ("key", "problem"),
    [("x" * 129, "1 to 128 characters"), ("a b", "visible ASCII"), ("caf\xe9", "visible ASCII")],
)
def test_a_bad_idempotency_key_is_400(tmp_path: Path, key: str, problem: str) -> None:
    with serve_in_thread(train_config(tmp_path)) as running:
        reply = train(running, {"inputs": [[0, 1]], "targets": [[1]]}, **{"Idempotency-Key": key})
        assert reply.status == 400 and problem in reply.json()["error"]
        assert status(running) == (0, 0)


def test_counters_survive_a_restart(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, max_batch=1)
    with serve_in_thread(cfg) as running:
        for _ in range(5):
            assert train(running, {"inputs": [[0, 1]], "targets": [[1]]}).status == 200
        assert train(running, {"inputs": [[-1]], "targets": [[0]]}, "fragile").status == 422
        assert status(running) == (5, 5)
        assert status(running, "fragile") == (0, 0)  # the refused example took no step
    with serve_in_thread(cfg) as running:
        assert status(running) == (5, 5)  # examples was 0: the final checkpoint left no replay
        assert status(running, "fragile") == (0, 0)


def test_a_damaged_newest_checkpoint_falls_back_end_to_end(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, max_batch=1, checkpoint_every_steps=2, keep_checkpoints=2)
    with serve_in_thread(cfg) as running:
        for i in range(7):
            body = {"inputs": [[i % 2, 1]], "targets": [[1 - i % 2]]}
            assert train(running, body).status == 200
        weights = predict(running, "xor", [[0, 1], [1, 1]]).json()
    newest = max((tmp_path / "state" / "checkpoints").glob("checkpoint-*"))
    assert newest.name == "checkpoint-0000000000000007.safetensors"  # the graceful stop's
    damage(newest)
    with serve_in_thread(cfg) as running:
        assert status(running) == (7, 7)
        reply = call(running, "GET", "/models/xor/train").json()
        assert reply["checkpoint_step"] < 7 and reply["replayed_steps"] > 0
        assert predict(running, "xor", [[0, 1], [1, 1]]).json() == weights


def test_damage_in_the_middle_of_the_newest_segment_stops_the_start(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, max_batch=1, checkpoint_every_steps=0)
    with serve_in_thread(cfg) as running:
        for _ in range(6):
            assert train(running, {"inputs": [[0, 1]], "targets": [[1]]}).status == 200
    (segment,) = (tmp_path / "state" / "wal").glob("wal-*.log")
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as caught:
        App(cfg)
    message = str(caught.value)
    assert str(segment) in message and "offset" in message and "not a torn tail" in message
    assert segment.read_bytes() == bytes(data)


def test_training_state_is_private(tmp_path: Path) -> None:
    with serve_in_thread(train_config(tmp_path, max_batch=1)) as running:
        assert train(running, {"inputs": [[0, 1]], "targets": [[1]]}).status == 200
    root = tmp_path / "state"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for path in root.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert {p.parent.name for p in root.rglob("*.*")} == {"wal", "checkpoints"}


@pytest.mark.parametrize("count", [0, 100_001])
def test_idempotency_keys_is_bounded(count: int) -> None:
    with pytest.raises(ValidationError, match="idempotency_keys"):
        TrainConfig(enabled=True, idempotency_keys=count)
