"""How the executor orders training and inference on one model, and what a failing log does.

The executor is driven directly on a real event loop: requests are submitted while the loop is
not running, then the loop runs until every one is answered, and the order of the answers shows
the order of the work.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import XOR, serve_in_thread
from tests.serve.test_server_models import call, predict
from tests.train.test_endpoints import train_config
from tests.train.test_wal import FullDisk
from webtorch import config as wt_config
from webtorch.config import TrainConfig
from webtorch.http.messages import Response
from webtorch.metrics import ModelStats
from webtorch.serve.executor import Executor
from webtorch.serve.model import load_model
from webtorch.train.forms import TrainRequest
from webtorch.train.trainer import Trainer


def run_order(tmp_path: Path, priority: str, kinds: list[str]) -> list[str]:
    """Submit requests of ``kinds`` ("infer" / "train") in order; return the answer order."""
    loop = asyncio.new_event_loop()
    model = load_model("xor", XOR)
    cfg = TrainConfig(enabled=True, durability="none", max_batch=2, priority=priority)  # type: ignore[arg-type]
    trainer = Trainer(model, cfg, tmp_path)
    executor = Executor(model, ModelStats(), max_batch=2, loop=loop, trainer=trainer)
    answered: list[str] = []
    done = asyncio.Event()

    def answer(label: str, response: Response) -> None:
        answered.append(label)
        if len(answered) == len(kinds):
            done.set()

    x = np.array([[0, 1]], dtype=np.float32)
    y = np.array([[1]], dtype=np.float32)
    for i, kind in enumerate(kinds):
        label = f"{kind}{i}"
        if kind == "infer":
            job = executor.submit({"x": x}, 1, lambda outputs: Response())
        else:
            job = executor.submit_train(
                TrainRequest({"x": x}, {"y": y}, 1), lambda req, loss, step: Response()
            )
        job.subscribe(answer, label)

    async def drain() -> None:
        await done.wait()
        await executor.close()

    loop.run_until_complete(drain())
    loop.close()
    return answered


def test_inference_goes_first_but_training_never_starves(tmp_path: Path) -> None:
    # Two rows per batch or step: train0/train1 are one step, infer2..infer7 three batches.
    kinds = ["train", "train", "infer", "infer", "infer", "infer", "infer", "infer"]
    order = run_order(tmp_path, "inference", kinds)
    # Inference first; then the waiting step; then inference again.
    assert order[:2] == ["infer2", "infer3"]
    assert order[2:4] == ["train0", "train1"]
    assert order[4:] == ["infer4", "infer5", "infer6", "infer7"]


def test_fifo_serves_the_older_queue_first(tmp_path: Path) -> None:
    kinds = ["train", "train", "infer", "infer", "infer", "infer"]
    order = run_order(tmp_path, "fifo", kinds)
    assert order[:2] == ["train0", "train1"]
    assert order[2:] == ["infer2", "infer3", "infer4", "infer5"]


def test_a_failing_log_stops_training_and_keeps_inference(tmp_path: Path) -> None:
    cfg = train_config(tmp_path)
    body = {"inputs": [[0, 1]], "targets": [[1]]}
    with serve_in_thread(cfg) as running:
        assert call(running, "POST", "/models/xor/train", body).status == 200
        after_one = predict(running, "xor", [[0, 1]]).json()
        trainer = running.app.repository.served["xor"].trainer
        assert trainer is not None and trainer.wal is not None
        # The disk fills (every write: ENOSPC), then space returns before shutdown.
        with FullDisk(trainer.wal):
            reply = call(running, "POST", "/models/xor/train", body)
            assert reply.status == 503
            assert "write-ahead log failed" in reply.json()["error"]
            again = call(running, "POST", "/models/xor/train", body)
            assert again.status == 503 and "training stopped" in again.json()["error"]
            assert predict(running, "xor", [[0, 1]]).json() == after_one  # not applied
            assert predict(running, "xor", [[0, 1]]).status == 200  # inference goes on
            status = call(running, "GET", "/models/xor/train").json()
            assert (status["step"], status["examples"]) == (1, 1)
    # The example answered 503 was never applied, and a restart must not apply it either: its
    # client will retry it.
    with serve_in_thread(cfg) as running:
        status = call(running, "GET", "/models/xor/train").json()
        assert (status["step"], status["examples"]) == (1, 1)
        assert predict(running, "xor", [[0, 1]]).json() == after_one


# An optimizer whose step fails (a device error, say) while the file ``fail`` beside it exists.
FLAKY_PY = """
import pathlib
import torch
from torch import nn
import webtorch

FLAG = pathlib.Path(__file__).with_name("fail")


class Flaky(torch.optim.SGD):
    def step(self, closure=None):
        if FLAG.exists():
            raise RuntimeError("device lost")
        return super().step(closure)


model = webtorch.Model(
    network=lambda: nn.Linear(1, 1),
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 1))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 1))],
    loss=lambda out, tgt: ((out["y"] - tgt["y"]) ** 2).mean(),
    optimizer=lambda params: Flaky(params, lr=0.1),
)
"""


def test_a_step_that_fails_after_logging_is_not_replayed(tmp_path: Path) -> None:
    # The micro-batch was logged and fsynced, then its optimizer step failed: its requests get a
    # 503, so a restart must not apply it (a client retrying the 503 would train twice).
    (tmp_path / "flaky.py").write_text(FLAKY_PY)
    cfg = wt_config.from_dict(
        {
            "models": {
                "flaky": {
                    "path": str(tmp_path / "flaky.py"),
                    "weights": False,
                    "train": {"enabled": True, "state_dir": str(tmp_path / "state")},
                }
            }
        }
    )
    body = {"inputs": [[1.0]], "targets": [[2.0]]}
    with serve_in_thread(cfg) as running:
        assert call(running, "POST", "/models/flaky/train", body).status == 200
        (tmp_path / "fail").touch()
        reply = call(running, "POST", "/models/flaky/train", body)
        assert reply.status == 503 and "optimizer step failed" in reply.json()["error"]
        (tmp_path / "fail").unlink()
    with serve_in_thread(cfg) as running:
        status = call(running, "GET", "/models/flaky/train").json()
        assert (status["step"], status["examples"]) == (1, 1)


@pytest.mark.parametrize("durability", ["none", "wal"])
def test_training_is_answered_in_step_order(tmp_path: Path, durability: str) -> None:
    with serve_in_thread(train_config(tmp_path, durability=durability, max_batch=1)) as running:
        steps = [
            call(
                running, "POST", "/models/xor/train", {"inputs": [[0, 1]], "targets": [[1]]}
            ).json()["step"]
            for _ in range(5)
        ]
        assert steps == [1, 2, 3, 4, 5]


def test_train_requests_arriving_over_loop_turns_join_one_step(tmp_path: Path) -> None:
    # One request now, then one more on each of the next loop turns (as answers of the last
    # step come back as new requests): the step waits for them while they keep coming.
    loop = asyncio.new_event_loop()
    model = load_model("xor", XOR)
    cfg = TrainConfig(enabled=True, durability="none", max_batch=8)
    executor = Executor(
        model, ModelStats(), max_batch=8, loop=loop, trainer=Trainer(model, cfg, tmp_path)
    )
    steps: list[int] = []
    answered = {4: asyncio.Event(), 5: asyncio.Event()}
    x = np.array([[0, 1]], dtype=np.float32)
    y = np.array([[1]], dtype=np.float32)

    def encode(request: TrainRequest, loss: float, step: int) -> Response:
        steps.append(step)
        if len(steps) in answered:
            answered[len(steps)].set()
        return Response()

    def submit(more: int) -> None:
        executor.submit_train(TrainRequest({"x": x}, {"y": y}, 1), encode)
        if more:
            loop.call_soon(submit, more - 1)

    async def drive() -> None:
        submit(3)
        await answered[4].wait()
        # Then a lone request: it waits one turn, finds nothing more, and goes alone.
        submit(0)
        await answered[5].wait()
        await executor.close()

    loop.run_until_complete(drive())
    loop.close()
    assert steps == [1, 1, 1, 1, 2]
