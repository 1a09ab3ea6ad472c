"""Baseline (d) of benchmarks/pipeline.py: the text classifier as Ray Serve model composition.
One deployment per stage (clean, featurize, model, label) and an ingress deployment that calls
them in turn through their DeploymentHandles, the way Ray's docs compose models. CPU only, on a
local Ray with ``--num-cpus`` CPUs (replicas ask for none, so all fit on a two-core machine).
The stage functions are the example's own (webtorch.examples.textcls.stages).

    python benchmarks/pipeline_ray.py --port 8200
    curl -s localhost:8200/predict -d '{"records": ["<p>hi</p>"]}'

Boundaries: a stage answers (result, its work's seconds); the ingress times each handle call, so
boundary = call - work is what Ray's serialization (pickle 5), its object transfer, the
replica's queue and the scheduling cost together (Ray does not expose them one by one).
``GET /stats`` returns the sums (``?reset=1`` zeroes them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

import numpy as np
import ray
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from webtorch.examples.textcls import stages

STAGES = ("clean", "featurize", "model", "label")
REPLICA = {"num_cpus": 0}


def _timed(fn: Any, arg: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(arg)
    return out, time.perf_counter() - t0


@serve.deployment(ray_actor_options=REPLICA)
class Clean:
    def __call__(self, records: list[str]) -> tuple[list[str], float]:
        return _timed(stages.clean, records)


@serve.deployment(ray_actor_options=REPLICA)
class Featurize:
    def __call__(self, texts: list[str]) -> tuple[np.ndarray, float]:
        return _timed(lambda t: stages.featurize(t)["ids"], texts)


@serve.deployment(ray_actor_options=REPLICA)
class Model:
    def __init__(self) -> None:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.net = stages.TextNet().eval()

    def __call__(self, ids: np.ndarray) -> tuple[np.ndarray, float]:
        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return self.net(torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]

        return _timed(run, ids)


@serve.deployment(ray_actor_options=REPLICA)
class Label:
    def __call__(self, logits: np.ndarray) -> tuple[list[dict[str, Any]], float]:
        return _timed(stages.label, logits)


@serve.deployment(ray_actor_options=REPLICA)
class Ingress:
    def __init__(self, clean: Any, featurize: Any, model: Any, label: Any) -> None:
        self.handles = (clean, featurize, model, label)
        self.sums = self._zero()

    @staticmethod
    def _zero() -> dict[str, dict[str, float]]:
        return {s: {"calls": 0.0, "call": 0.0, "work": 0.0, "boundary": 0.0} for s in STAGES}

    async def __call__(self, request: Request) -> Response:
        if request.url.path.endswith("/stats"):
            out = json.dumps(self.sums)
            if request.query_params.get("reset"):
                self.sums = self._zero()
            return Response(out, media_type="application/json")
        value: Any = json.loads(await request.body())["records"]
        for name, handle in zip(STAGES, self.handles, strict=True):
            t0 = time.perf_counter()
            value, work = await handle.remote(value)
            call = time.perf_counter() - t0
            s = self.sums[name]
            s["calls"] += 1
            s["call"] += call
            s["work"] += work
            s["boundary"] += call - work
        return Response(json.dumps({"outputs": value}), media_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()
    # A short scratch path: Ray's Unix sockets live under it (a 107-byte limit).
    scratch = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
    print(f"ray scratch {scratch}", flush=True)  # the benchmark removes it if this cannot
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        _temp_dir=scratch,
        log_to_driver=False,
    )
    serve.start(http_options={"host": args.host, "port": args.port})
    app = Ingress.bind(Clean.bind(), Featurize.bind(), Model.bind(), Label.bind())
    serve.run(app, route_prefix="/")
    print(f"ray serve listening on http://{args.host}:{args.port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(scratch, ignore_errors=True)  # Ray's logs and sockets


if __name__ == "__main__":
    main()
