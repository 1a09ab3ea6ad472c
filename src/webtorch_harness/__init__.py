"""One process harness: start a server as a subprocess, wait until it is ready, find its port,
read its CPU, stop it and collect its log. The demo, the guard's live evaluation, the lab, the
benchmarks and the tests all drive ``webtorch serve`` (and nginx, FastAPI, ...) through it.

Why a package of its own (``webtorch_harness``) and not a module in ``webtorch``: what
``webtorch serve`` loads is the server and nothing else (ARCHITECTURE.md, pinned by
tests/test_runtime_imports.py), and the harness is a client of the server, not part of it. Like
the other tool packages it sits above the runtime; unlike them it imports nothing from it (only
the standard library), so a benchmark script can use it without loading torch, and a tool
package can import it without coupling to another tool.

The design, in one place:

- A child runs in a session of its own, its stdout and stderr going straight to one log file:
  a chatty server can never fill a pipe that nobody reads, and the harness costs no CPU while
  the child runs (what the benchmarks measure). The whole session is signalled on stop (nginx's
  workers, a server's process workers) and its CPU is summed over all its processes.
- Nothing waits by sleeping: each wait polls a condition (a log line, an HTTP answer) against
  a deadline, and between two polls it waits on the child itself, so a child that exits ends
  the wait at once with its status and the tail of its log.
- A start that fails (exits, or is not ready in time) stops what it started before it raises;
  a handle used as a context manager is stopped when the block exits, whatever happens.
"""

from webtorch_harness.process import (
    LISTEN,
    READY_TIMEOUT,
    STOP_TIMEOUT,
    CpuTimes,
    HarnessError,
    Process,
    Server,
    Stopped,
    cpu_times,
    free_port,
    serve,
    session_pids,
    start,
    stop_session,
)

__all__ = [
    "LISTEN",
    "READY_TIMEOUT",
    "STOP_TIMEOUT",
    "CpuTimes",
    "HarnessError",
    "Process",
    "Server",
    "Stopped",
    "cpu_times",
    "free_port",
    "serve",
    "session_pids",
    "start",
    "stop_session",
]
