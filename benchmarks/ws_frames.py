"""The WebSocket's cost per frame in, without sockets or a model: one connection
(streams/websocket.py) fed the same masked text frame (an activity item, one per read, as a
device sends them), its handler counting messages; wsproto's path (every frame through
wsproto) against the connection's own frame cut (the default while OPEN without extensions).

    PYTHONPATH=src .venv/bin/python benchmarks/ws_frames.py [--frames 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from wsproto.connection import Connection, ConnectionType

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ws_load

from webtorch.config import StreamsConfig
from webtorch.streams.hub import Hub
from webtorch.streams.websocket import WebSocket

ITEM = b'{"x": [0.12345678901234, 9.7123456789012, 0.3123456789012]}'


class Transport:
    """What the connection calls on its transport: nothing is written anywhere."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class Counter:
    messages = 0

    def message(self, ws: WebSocket, data: str | bytes) -> None:
        self.messages += 1

    def closed(self, ws: WebSocket, code: int) -> None:
        pass


async def per_frame(split: bool, frames: int) -> float:
    """The best of five rounds, microseconds per frame."""
    loop = asyncio.get_running_loop()
    hub = Hub(StreamsConfig(), loop.time)
    counter = Counter()
    ws = WebSocket(hub, Connection(ConnectionType.SERVER), counter, lambda: None)
    ws.split = split
    ws.connection_made(Transport())  # type: ignore[arg-type]
    frame = ws_load.client_frame(ITEM)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(frames):
            ws.data_received(frame)
        best = min(best, (time.perf_counter() - t0) / frames * 1e6)
    assert counter.messages == 5 * frames
    return best


async def main(frames: int) -> None:
    for split, name in ((False, "wsproto"), (True, "own frame cut")):
        print(f"{name}: {await per_frame(split, frames):.2f} us/frame", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    asyncio.run(main(parser.parse_args().frames))
