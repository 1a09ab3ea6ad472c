"""Online training of XOR behind FastAPI + uvicorn, written the naive way: the reference point.

A global network and SGD optimizer, and ``POST /train`` with ``{"inputs": [[0, 1]], "targets":
[[1]]}`` runs zero_grad, forward, BCE loss, backward and step, then answers ``{"loss": float,
"step": int}``: one optimizer step per request, as the original WebTorch did and as tutorials show
it. The handler is a plain ``def``, the form FastAPI's docs recommend for blocking work such as
torch calls, so FastAPI runs it in its thread pool, and there is no lock: that is the point. Under
concurrency the pool's threads run zero_grad, backward and step on the same parameters at once: one
request's in-place ``optimizer.step()`` can land between another's forward and backward pass
(autograd's "modified by an inplace operation" error, a 500), ``zero_grad`` frees gradients another
thread is accumulating into, and on this machine the process dies of a segmentation fault within a
second of 64 concurrent clients. ``benchmarks/train.py`` measures it, counts 5xx answers and checks
whether the process survived. ``--handler async`` makes the handler an ``async def`` instead, run
on the event loop one request at a time: no race, but no overlap or batching either.

The network, loss and optimizer are the XOR example's (``src/webtorch/examples/xor.py``, trained
weights from ``xor.safetensors``), loaded as ``benchmarks/fastapi_xor.py`` loads them. Run it and
ask it::

    python benchmarks/fastapi_train.py --port 8000 [--handler def|async]
    curl -s -H 'Content-Type: application/json' localhost:8000/train \
        -d '{"inputs": [[0, 1]], "targets": [[1]]}'
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

import webtorch.examples
from webtorch.serve.model import load_model

# Loaded as `webtorch serve` loads it: xor.py, then xor.safetensors beside it.
XOR_FILE = Path(webtorch.examples.__file__).resolve().parent / "xor.py"


class TrainRequest(BaseModel):
    inputs: list[list[float]]
    targets: list[list[float]]


class TrainResponse(BaseModel):
    loss: float
    step: int


def make_app(handler: str = "def") -> FastAPI:
    xor = load_model("xor", XOR_FILE)
    assert xor.spec.loss is not None and xor.spec.optimizer is not None
    loss_fn, network = xor.spec.loss, xor.network
    network.train()
    optimizer = xor.spec.optimizer(network.parameters())
    step = 0
    app = FastAPI()

    def train(request: TrainRequest) -> TrainResponse:
        nonlocal step
        x = torch.tensor(request.inputs, dtype=torch.float32)
        y = torch.tensor(request.targets, dtype=torch.float32)
        optimizer.zero_grad()
        loss = loss_fn({"y": network(x)}, {"y": y})
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        step += 1
        return TrainResponse(loss=loss.item(), step=step)

    async def train_async(request: TrainRequest) -> TrainResponse:
        return train(request)

    app.post("/train")(train if handler == "def" else train_async)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--handler",
        choices=("def", "async"),
        default="def",
        help="a plain `def` run in the thread pool (default) or an `async def` on the loop",
    )
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.handler),
        host=args.host,
        port=args.port,
        workers=1,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
