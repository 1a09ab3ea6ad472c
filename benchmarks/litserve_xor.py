"""The XOR model behind LitServe with dynamic batching: one CPU inference worker, one API server.

Run it and ask it::

    python benchmarks/litserve_xor.py --port 8000
    curl -s -H 'Content-Type: application/json' localhost:8000/models/xor/predict \
        -d '{"inputs": [[0, 1]]}'
"""

from __future__ import annotations

import argparse
from pathlib import Path

import litserve as ls  # type: ignore[import-untyped]
import torch

import webtorch.examples
from webtorch.serve.model import LoadedModel, load_model

MAX_BATCH_SIZE = 64
BATCH_TIMEOUT = 0.001  # seconds LitServe waits to fill a batch

# Loaded as `webtorch serve` loads it: xor.py, then xor.safetensors beside it.
XOR_FILE = Path(webtorch.examples.__file__).resolve().parent / "xor.py"


class XorAPI(ls.LitAPI):  # type: ignore[misc]
    """A request may hold several rows, so a batch is a list of (rows, 2) tensors: they are
    concatenated for one forward pass and the result split back per request."""

    model: LoadedModel

    def setup(self, device: str) -> None:
        self.model = load_model("xor", XOR_FILE)

    # LitServe builds its FastAPI route from these two annotations; left out, the route takes the
    # raw JSON body and returns the dict as is, the quick-start form (no pydantic validation).
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return torch.tensor(request["inputs"], dtype=torch.float32)

    def batch(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return inputs

    def predict(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        parts = x if isinstance(x, list) else [x]
        with torch.inference_mode():
            y: torch.Tensor = self.model.forward({"x": torch.cat(parts)})["y"]
        if not isinstance(x, list):
            return y
        return list(torch.split(y, [len(p) for p in parts]))

    def unbatch(self, output: list[torch.Tensor]) -> list[torch.Tensor]:
        return output

    def encode_response(self, output: torch.Tensor):  # type: ignore[no-untyped-def]
        return {"outputs": output.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    api = XorAPI(
        max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT, api_path="/models/xor/predict"
    )
    # fast_queue: ZeroMQ between the API server and the worker, which LitServe's docs recommend
    # above 100 req/s; it about doubled throughput here.
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, fast_queue=True)
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
        access_log=False,
    )


if __name__ == "__main__":
    main()
