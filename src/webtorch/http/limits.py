"""Size limits and timeouts of the HTTP server; defaults follow nginx's where it has one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    max_url: int = 8 * 1024  # 414 above (nginx large_client_header_buffers: 8k)
    max_header_bytes: int = 32 * 1024  # 431 above: request line excluded, all header lines
    max_headers: int = 100  # 431 above
    max_body: int = 16 * 1024 * 1024  # 413 above (nginx client_max_body_size defaults to 1m)
    header_timeout: float = 10.0  # 408 + close: a request's headers must arrive within this
    body_timeout: float = 60.0  # 408 + close: a request's body must arrive within this
    keepalive_timeout: float = 75.0  # idle keep-alive connections are closed after this
    max_pipeline: int = 64  # stop reading while this many requests await their responses
    drain_timeout: float = 30.0  # graceful shutdown waits this long for in-flight requests
    # Client connections open at once (nginx's worker_connections). At the cap, the idle
    # connection nearest its timeout is closed for a new one, else the new one gets a 503.
    # The server lowers it to what RLIMIT_NOFILE leaves room for (see HttpServer.start).
    max_connections: int = 4096
