"""A WebSocket echo server (the websockets package, asyncio): the upstream of benchmarks/
streams.py's proxy comparison.

    python benchmarks/ws_echo.py --port 8300
"""

from __future__ import annotations

import argparse
import asyncio

from websockets.asyncio.server import ServerConnection, serve


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def main(port: int) -> None:
    async with serve(echo, "127.0.0.1", port, compression=None, max_size=1 << 20):
        print(f"listening on 127.0.0.1:{port}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8300)
    asyncio.run(main(parser.parse_args().port))
