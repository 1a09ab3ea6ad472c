"""Baseline (c) of benchmarks/pipeline.py: the text classifier's stages as FastAPI microservices,
the way teams usually build it. One uvicorn process per stage (clean, featurize, model, label)
and a gateway that calls them in turn over HTTP with JSON bodies and pydantic models, through one
keep-alive httpx client per stage. The stage functions are the example's own
(webtorch.examples.textcls.stages), so the work per document is the same as WebTorch's.

    python benchmarks/pipeline_fastapi.py --role clean --port 8101
    ... featurize 8102, model 8103, label 8104, then
    python benchmarks/pipeline_fastapi.py --role gateway --port 8100 \
        --stages http://127.0.0.1:8101,http://127.0.0.1:8102,http://127.0.0.1:8103,http://127.0.0.1:8104
    curl -s localhost:8100/predict -d '{"records": ["<p>hi</p>"]}'

Every boundary is measured, not estimated: a stage service times its request's parse and
validation (deserialize), its work and its answer's encoding (serialize) and returns them in an
``x-timing`` header; the gateway times its own encoding of the request, the call, and its parse
of the answer. transfer = call - (the service's deserialize + work + serialize): the sockets,
the HTTP parsing on both sides and any wait in the service's queue. ``GET /stats`` on the gateway
returns the sums (``?reset=1`` zeroes them).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import httpx
import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel

from webtorch.examples.textcls import stages

STAGES = ("clean", "featurize", "model", "label")
JSON = "application/json"


class Records(BaseModel):
    records: list[str]


class Texts(BaseModel):
    texts: list[str]


class Ids(BaseModel):
    ids: list[list[int]]


class Logits(BaseModel):
    logits: list[list[float]]


class Outputs(BaseModel):
    outputs: list[dict[str, Any]]


# (request model, answer model, work) per stage.
def _network() -> Callable[[Ids], Logits]:
    torch.manual_seed(0)
    net = stages.TextNet().eval()

    def run(body: Ids) -> Logits:
        with torch.inference_mode():
            logits = net(torch.tensor(body.ids, dtype=torch.int64))
        return Logits(logits=logits.tolist())

    return run


def _stage(role: str) -> tuple[type[BaseModel], Callable[[Any], BaseModel]]:
    if role == "clean":
        return Records, lambda b: Texts(texts=stages.clean(b.records))
    if role == "featurize":
        return Texts, lambda b: Ids(ids=stages.featurize(b.texts)["ids"].tolist())
    if role == "model":
        return Ids, _network()
    if role == "label":
        return Logits, lambda b: Outputs(outputs=stages.label(torch.tensor(b.logits)))
    raise SystemExit(f"unknown role {role!r}")


def stage_app(role: str) -> FastAPI:
    request_model, work = _stage(role)
    app = FastAPI()

    # async def: the work is CPU-bound and short; FastAPI's thread pool (a plain def) only adds
    # a hop with one worker process per stage (benchmarks/fastapi_xor.py measured the same).
    @app.post(f"/{role}")
    async def handle(request: Request) -> Response:
        raw = await request.body()
        t0 = time.perf_counter()
        body = request_model.model_validate_json(raw)
        t1 = time.perf_counter()
        answer = work(body)
        t2 = time.perf_counter()
        out = answer.model_dump_json()
        t3 = time.perf_counter()
        timing = f"{t1 - t0:.9f},{t2 - t1:.9f},{t3 - t2:.9f}"
        return Response(out, media_type=JSON, headers={"x-timing": timing})

    return app


class Boundary:
    """Sums over the calls to one stage, in seconds and bytes."""

    FIELDS = (
        "calls",
        "client_serialize",
        "server_deserialize",
        "work",
        "server_serialize",
        "client_deserialize",
        "call",
        "transfer",
        "bytes_out",
        "bytes_in",
    )

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.FIELDS, 0.0)

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.sums[key] += value


def gateway_app(urls: list[str]) -> FastAPI:
    app = FastAPI()
    clients: list[httpx.AsyncClient] = []
    boundaries = {s: Boundary() for s in STAGES}
    answers: list[type[BaseModel]] = [Texts, Ids, Logits, Outputs]
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)

    @app.on_event("startup")
    async def _open() -> None:
        for url in urls:
            clients.append(httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0))

    async def call(i: int, body: BaseModel) -> Any:
        b = boundaries[STAGES[i]]
        t0 = time.perf_counter()
        payload = body.model_dump_json().encode()
        t1 = time.perf_counter()
        r = await clients[i].post(f"/{STAGES[i]}", content=payload, headers={"content-type": JSON})
        t2 = time.perf_counter()
        r.raise_for_status()
        answer = answers[i].model_validate_json(r.content)
        t3 = time.perf_counter()
        deser, work, ser = (float(x) for x in r.headers["x-timing"].split(","))
        b.add(
            calls=1,
            client_serialize=t1 - t0,
            server_deserialize=deser,
            work=work,
            server_serialize=ser,
            client_deserialize=t3 - t2,
            call=t2 - t1,
            transfer=(t2 - t1) - (deser + work + ser),
            bytes_out=len(payload),
            bytes_in=len(r.content),
        )
        return answer

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        body = Records.model_validate_json(await request.body())
        texts = await call(0, body)
        ids = await call(1, texts)
        logits = await call(2, ids)
        outputs = await call(3, logits)
        return Response(outputs.model_dump_json(), media_type=JSON)

    @app.get("/stats")
    async def stats(reset: int = 0) -> dict[str, dict[str, float]]:
        out = {s: dict(b.sums) for s, b in boundaries.items()}
        if reset:
            for s in STAGES:
                boundaries[s] = Boundary()
        return out

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", required=True, choices=("gateway", *STAGES))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stages", help="the gateway's: the four stage URLs, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.role == "gateway":
        if not args.stages or len(args.stages.split(",")) != len(STAGES):
            raise SystemExit("--stages: four URLs (clean, featurize, model, label)")
        app = gateway_app(args.stages.split(","))
    else:
        app = stage_app(args.role)
    print(f"{args.role} listening on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
