"""The XOR model behind FastAPI + uvicorn, written the way the FastAPI docs suggest.

One uvicorn worker, pydantic request and response models, no batching. The endpoint is
``async def``: FastAPI's docs suggest a plain ``def`` (run in its thread pool) for blocking work,
but XOR's forward pass takes microseconds, less than the hop to the pool, and ``async def`` served
about 3.5x the requests of ``def`` here, so the comparison is made with FastAPI's faster form.
Run it and ask it::

    python benchmarks/fastapi_xor.py --port 8000
    curl -s -H 'Content-Type: application/json' localhost:8000/models/xor/predict \
        -d '{"inputs": [[0, 1]]}'
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


class PredictRequest(BaseModel):
    inputs: list[list[float]]


class PredictResponse(BaseModel):
    outputs: list[list[float]]


def make_app() -> FastAPI:
    model = load_model("xor", XOR_FILE)
    app = FastAPI()

    @app.post("/models/xor/predict")
    async def predict(request: PredictRequest) -> PredictResponse:
        with torch.inference_mode():
            x = torch.tensor(request.inputs, dtype=torch.float32)
            y = model.forward({"x": x})["y"]
        return PredictResponse(outputs=y.tolist())

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(
        make_app(), host=args.host, port=args.port, workers=1, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
