"""The reference point DESIGN.md quotes: a ~40-line uvloop + httptools + orjson XOR server with
batching. It has none of what makes WebTorch a server (no validation, limits, metrics, routing,
pipelined ordering, timeouts, error answers), so it marks the floor of Python overhead on this
stack: the distance between it and WebTorch is the price of those features.

    python benchmarks/prototype_xor.py --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import httptools
import numpy as np
import orjson
import torch
import uvloop

import webtorch.examples
from webtorch.serve.model import load_model

XOR_FILE = Path(webtorch.examples.__file__).resolve().parent / "xor.py"
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
NET = load_model("xor", XOR_FILE).network
QUEUE: list[tuple[asyncio.Transport, list[Any]]] = []


def run_batch() -> None:
    batch = QUEUE[:]
    QUEUE.clear()
    x = torch.tensor([row for _, rows in batch for row in rows], dtype=torch.float32)
    with torch.inference_mode():
        y: np.ndarray = NET(x).numpy()
    start = 0
    for transport, rows in batch:
        body = orjson.dumps(
            {"outputs": y[start : start + len(rows)]}, option=orjson.OPT_SERIALIZE_NUMPY
        )
        start += len(rows)
        transport.write(HEAD % len(body) + body)


class Prototype(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.parser = httptools.HttpRequestParser(self)
        self.body = b""

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        rows = orjson.loads(self.body)["inputs"]
        self.body = b""
        if not QUEUE:
            asyncio.get_running_loop().call_soon(run_batch)
        QUEUE.append((self.transport, rows))


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Prototype, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
