"""Baseline of benchmarks/streams.py: the activity model behind a FastAPI WebSocket endpoint,
the way it is usually written: one coroutine per connection keeps its window of the last 50
samples and runs torch on it for every 10th message (no batching across streams). The model
and its weights are the example's (webtorch.examples.activity), the wire format the same as
WebTorch's, so the work per item is the same.

    python benchmarks/streams_fastapi.py --port 8200
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections import deque
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from webtorch.serve.model import load_model

EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "webtorch" / "examples" / "activity"
WINDOW, EVERY = 50, 10

torch.set_num_threads(1)
model = load_model("activity", EXAMPLE / "activity.py")
app = FastAPI()


@app.get("/v2/health/ready")
def ready() -> dict[str, bool]:
    return {"ready": True}


@app.websocket("/v2/models/activity/stream")
async def stream(ws: WebSocket) -> None:
    await ws.accept()
    await ws.send_text(json.dumps({"stream": uuid.uuid4().hex, "resumed": False}))
    window: deque[list[float]] = deque(maxlen=WINDOW)
    count = 0
    try:
        while True:
            item = json.loads(await ws.receive_text())
            window.append(item["x"])
            count += 1
            if count >= WINDOW and (count - WINDOW) % EVERY == 0:
                with torch.inference_mode():
                    probs = model.forward({"x": torch.tensor([list(window)])})["probs"]
                answer = {"id": item.get("id", count - 1), "outputs": {"probs": probs[0].tolist()}}
                await ws.send_text(json.dumps(answer))
    except WebSocketDisconnect:
        return


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8200)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
