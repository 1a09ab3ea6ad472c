"""A WebSocket sink: answers the opening handshake (wsproto's H11Handshake), sends one text
message (as WebTorch's stream hello), then reads and drops everything. What benchmarks/
streams.py's ``--ceiling`` offers its load to, so that the load generator's own limit is
measured without a server's.

    python benchmarks/ws_sink.py --port 8400
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, Request
from wsproto.handshake import H11Handshake

HELLO = b'\x81\x0f{"stream":"s1"}'


class Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.shake: H11Handshake | None = H11Handshake(ConnectionType.SERVER)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        shake = self.shake
        if shake is None:
            return  # frames: dropped
        assert self.transport is not None
        shake.receive_data(data)
        for event in shake.events():
            if isinstance(event, Request):
                self.transport.write(shake.send(AcceptConnection()) + HELLO)
                self.shake = None
                return


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", port, backlog=4096)
    print(f"listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8400)
    uvloop.run(main(parser.parse_args().port))
