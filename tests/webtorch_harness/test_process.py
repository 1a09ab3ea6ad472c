"""The process harness (webtorch_harness): readiness without sleeps, CPU from /proc, a stop that
ends the child's whole session and returns its log, and clean-up when a start fails."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import XOR
from webtorch_harness import HarnessError, Process, serve, session_pids, start

# A child that prints a line once it is set up, then blocks until signalled.
_WAITS = "import signal, sys; print('ready', flush=True); signal.pause()"
# ... that ignores SIGTERM, so that only SIGKILL ends it.
_STUBBORN = (
    "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
    "signal.pause()"
)
# ... that starts a worker (same session) before it says so, and spins a little first.
_FORKS = (
    "import os, signal, sys\n"
    "sum(range(2_000_000))\n"
    "if os.fork() == 0:\n    signal.pause()\n"
    "print('ready', os.getpid(), flush=True); signal.pause()"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"


def test_serve_finds_the_port_answers_counts_cpu_and_stops_cleanly() -> None:
    toml = f'[models.xor]\npath = "{XOR}"\n'
    with serve(toml=toml, ready_path="/v2/health/ready") as server:
        workdir = server.workdir
        assert server.port is not None and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        status, body = server.wait_http(
            "/models/xor/predict", method="POST", body=b'{"inputs": [[0, 1]]}', timeout=30
        )
        assert status == 200 and b"outputs" in body
        cpu = server.cpu_times()
        assert cpu.processes >= 1 and cpu.total > 0  # importing torch is not free
        stopped = server.stop()
        assert stopped.returncode == 0 and not stopped.killed
        assert "listening on" in stopped.log and "webtorch stopped" in stopped.log
        assert server.stop() is stopped  # a second stop answers the same
    assert not workdir.exists()  # the scratch directory it made is gone


def test_a_server_that_exits_before_listening_is_reported_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(HarnessError) as caught:
        serve(toml="[models.xor]\npath = 'no-such-model.py'\n", timeout=60)
    message = str(caught.value)
    assert "webtorch serve exited with status" in message
    assert "no-such-model.py" in message  # the log's tail says why


def test_a_child_not_ready_in_time_is_an_error_and_is_stopped(tmp_path: Path) -> None:
    child = start([sys.executable, "-c", "import signal; signal.pause()"], log=tmp_path / "l")
    with child, pytest.raises(HarnessError, match=r"not logging 'ready' within 0\.2 s"):
        child.wait_log("ready", timeout=0.2)
    assert child.poll() is not None and child.stop().returncode == -signal.SIGTERM


def test_stop_kills_a_child_that_ignores_its_signal(tmp_path: Path) -> None:
    with start([sys.executable, "-c", _STUBBORN], log=tmp_path / "log") as child:
        child.wait_log("ready", timeout=30)
        stopped = child.stop(timeout=0.3)
    assert stopped.killed and stopped.returncode == -signal.SIGKILL
    assert stopped.log == "ready\n"


def test_the_session_is_counted_and_stopped_whole(tmp_path: Path) -> None:
    child = start([sys.executable, "-c", _FORKS], log=tmp_path / "log")
    with child:
        child.wait_log("ready", timeout=30)
        pids = child.pids()
        assert child.pid in pids and len(pids) == 2 and set(session_pids(child.pid)) == set(pids)
        assert child.cpu_times().processes == 2
        assert child.cpu_times(session=False).processes == 1
        worker = next(pid for pid in pids if pid != child.pid)
        assert child.stop().returncode == -signal.SIGTERM
    assert not _alive(worker)


def test_wait_http_polls_until_ready_and_gives_up_when_told(tmp_path: Path) -> None:
    # A server that answers 503 first, then 200: waits until it is ready.
    script = (
        "import http.server, sys\n"
        "n = [0]\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        n[0] += 1\n"
        "        self.send_response(200 if n[0] > 2 else 503); self.end_headers()\n"
        "        self.wfile.write(b'hi')\n"
        "    def log_message(self, *a): pass\n"
        "s = http.server.HTTPServer(('127.0.0.1', 0), H)\n"
        "print('port', s.server_address[1], flush=True); s.serve_forever()\n"
    )
    with start([sys.executable, "-c", script], log=tmp_path / "log") as child:
        child.port = int(child.wait_log(r"port (\d+)", timeout=30)[1])
        assert child.wait_http("/", timeout=30) == (200, b"hi")

        def refuse(status: int, body: bytes) -> bool:
            raise ValueError(f"no good: {status}")

        with pytest.raises(ValueError, match="no good: 200"):
            child.wait_http("/", ready=refuse)


def test_a_failed_start_leaves_nothing_behind() -> None:
    with pytest.raises(HarnessError, match="cannot start no-such-program"):
        start(["no-such-program-anywhere"])


def test_a_child_that_exits_ends_a_wait_at_once(tmp_path: Path) -> None:
    child: Process = start([sys.executable, "-c", "print('bye')"], log=tmp_path / "log")
    with child, pytest.raises(HarnessError, match=r"exited with status 0 before .*\n.*bye"):
        child.wait_log("never", timeout=60)


def test_the_harness_imports_only_the_standard_library() -> None:
    # A benchmark script imports it without loading torch, and no tool couples through it.
    import ast

    import webtorch_harness

    imported = set()
    for path in Path(webtorch_harness.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    allowed = sys.stdlib_module_names | {"__future__", "webtorch_harness"}
    assert imported - allowed == set()
