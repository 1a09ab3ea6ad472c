"""``server.workers = 2`` as processes: a master and two workers on one port, through
webtorch_harness. Which worker answered is read from its /metrics (``webtorch_worker{pid}``) on
the same keep-alive connection. Every wait polls a condition against a deadline."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

import webtorch_harness as harness
from webtorch_harness import Server

TIMEOUT = 30.0
WORKER = re.compile(r"webtorch_worker\{pid=\"(\d+)\",slot=\"(\d+)\"\} 1\.0")
PID_LINE = re.compile(r"worker (\d+): pid (\d+)")

T = TypeVar("T")
Connection = http.client.HTTPConnection


def config(
    body: str = "v1",
    *,
    socket_mode: str = "reuseport",
    heartbeat: float = 10.0,
    extra: str = "",
) -> str:
    return f"""
[server]
listen = "127.0.0.1:0"
workers = 2

[server.master]
heartbeat_timeout = {heartbeat}
restart_delay = 0.05
listen_socket = "{socket_mode}"

[[routes]]
path = "/hello"
return = 200
body = "{body}"
{extra}
"""


def poll(check: Callable[[], T | None], what: str, timeout: float = TIMEOUT) -> T:
    """``check()`` until it returns something; an error naming ``what`` past the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout} s")
        time.sleep(0.02)  # between two polls of a condition, not in place of one


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by whoever adopted it, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def pids(server: Server, after: int = 0) -> dict[int, int]:
    """slot -> pid, from the lines the master printed (the latest per slot)."""
    text = server.log_path.read_bytes()[after:].decode(errors="replace")
    return {int(slot): int(pid) for slot, pid in PID_LINE.findall(text)}


def worker_of(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    body = response.read().decode()
    assert response.status == 200
    match = WORKER.search(body)
    assert match is not None, body[:500]
    return int(match[1])


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


@contextmanager
def one_per_worker(
    server: Server, want: set[int]
) -> Iterator[dict[int, http.client.HTTPConnection]]:
    """A keep-alive connection to each worker in ``want``: new connections until each pid has
    answered one (the kernel spreads them), the others closed."""
    found: dict[int, Connection] = {}
    try:

        def check() -> dict[int, Connection] | None:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
            pid = worker_of(conn)
            if pid in want and pid not in found:
                found[pid] = conn
            else:
                conn.close()
            return found if set(found) == want else None

        yield poll(check, f"reaching workers {sorted(want)}")
    finally:
        for conn in found.values():
            conn.close()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[Server]:
    with harness.serve(toml=config(heartbeat=1.0), workdir=tmp_path) as server:
        yield server


# Stopped as a terminal's Ctrl-C or systemd would: the signal reaches the whole process group,
# so each worker gets it twice (directly and from the master) and must still exit 0.
@pytest.mark.parametrize(
    ("socket_mode", "stop"), [("reuseport", signal.SIGTERM), ("shared", signal.SIGINT)]
)
def test_both_workers_serve(tmp_path: Path, socket_mode: str, stop: int) -> None:
    with harness.serve(toml=config(socket_mode=socket_mode), workdir=tmp_path) as server:
        workers = pids(server)
        assert sorted(workers) == [0, 1]
        assert server.pid not in workers.values()
        assert {p for p in server.pids() if p != server.pid} == set(workers.values())
        with one_per_worker(server, set(workers.values())) as conns:
            for conn in conns.values():
                assert get(conn, "/hello") == (200, b"v1")
        stopped = server.stop(stop)
    assert stopped.returncode == 0 and not stopped.killed
    assert "KeyboardInterrupt" not in stopped.log
    assert "with 2 workers" in stopped.log
    assert "webtorch stopped" in stopped.log
    assert "Traceback" not in stopped.log


def test_a_killed_worker_costs_the_other_nothing_and_comes_back(two: Server) -> None:
    workers = pids(two)
    victim, survivor = workers[0], workers[1]
    failures: list[str] = []
    served = [0]
    stop = threading.Event()
    with one_per_worker(two, {survivor}) as conns:
        conn = conns[survivor]

        def load() -> None:  # requests on the surviving worker, back to back
            while not stop.is_set():
                try:
                    answer = get(conn, "/hello")
                except (OSError, http.client.HTTPException) as exc:
                    failures.append(repr(exc))
                    return
                if answer != (200, b"v1"):
                    failures.append(repr(answer))
                served[0] += 1

        thread = threading.Thread(target=load)
        thread.start()
        try:
            poll(lambda: served[0] >= 20 or None, "under load")
            after = two.log_size()
            os.kill(victim, signal.SIGKILL)
            two.wait_log(r"worker 0: pid \d+ \(restarted\)", TIMEOUT, after)
            at_restart = served[0]
            poll(lambda: served[0] >= at_restart + 20 or None, "serving after the restart")
        finally:
            stop.set()
            thread.join(TIMEOUT)
    assert failures == []
    replacement = pids(two)[0]
    assert replacement != victim and not alive(victim)
    assert f"worker 0 (pid {victim}) was killed by SIGKILL" in two.log_text()
    with one_per_worker(two, {replacement, survivor}) as conns:
        for conn in conns.values():
            assert get(conn, "/hello") == (200, b"v1")
            status, body = get(conn, "/metrics")  # counted, whichever worker answers
            assert status == 200
            assert 'webtorch_worker_restarts_total{cause="exited"} 1.0' in body.decode()


def test_a_stuck_worker_is_killed_and_replaced(two: Server) -> None:
    workers = pids(two)
    stuck = workers[1]
    after = two.log_size()
    # A stopped process runs nothing: its event loop does not tick, as a loop blocked in a
    # forward pass would not (test_a_model_that_blocks_its_loop_is_replaced does that).
    os.kill(stuck, signal.SIGSTOP)
    two.wait_log(rf"worker 1 \(pid {stuck}\) was stuck \(no heartbeat", TIMEOUT, after)
    two.wait_log(r"worker 1: pid \d+ \(restarted\)", TIMEOUT, after)
    assert not alive(stuck)
    with one_per_worker(two, {workers[0], pids(two)[1]}):
        pass


def test_sighup_reloads_every_worker_and_a_bad_file_changes_nothing(two: Server) -> None:
    assert two.config_path is not None
    workers = set(pids(two).values())
    two.config_path.write_text(config("v2", heartbeat=1.0))
    after = two.log_size()
    two.send(signal.SIGHUP)
    for slot in (0, 1):
        two.wait_log(rf"\(worker {slot}\): reloaded ", TIMEOUT, after)
    with one_per_worker(two, workers) as conns:
        for conn in conns.values():
            assert get(conn, "/hello") == (200, b"v2")

    # Invalid: the master says why, and no worker is asked to reload.
    first_bad = two.log_size()
    for bad, why in [
        ('[server]\nlisten = "127.0.0.1:0"\nworkers = 2\nbogus = 1\n', "bogus"),
        (config("v3", heartbeat=1.0).replace("workers = 2", "workers = 3"), "workers changed"),
        (config("v3", heartbeat=1.0, extra='[models.x]\npath = "x.py"\n'), "[models] changed"),
    ]:
        two.config_path.write_text(bad)
        after = two.log_size()
        two.send(signal.SIGHUP)
        failed = r"reload failed, every worker keeps the previous config: "
        two.wait_log(failed, TIMEOUT, after)
        assert why in two.log_text()[after:]
    assert "): reloaded" not in two.log_text()[first_bad:]
    with one_per_worker(two, workers) as conns:
        for conn in conns.values():
            assert get(conn, "/hello") == (200, b"v2")


class HeldUpstream:
    """An upstream that answers once the test says so: a request in flight on demand."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.started = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            self.started.set()
            self.release.wait(TIMEOUT)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")

    def close(self) -> None:
        self.release.set()
        self.listener.close()


def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path: Path) -> None:
    upstream = HeldUpstream()
    extra = f"""
[upstreams.held]
servers = ["127.0.0.1:{upstream.port}"]

[[routes]]
path = "/slow"
upstream = "held"
"""
    with ExitStack() as stack:
        stack.callback(upstream.close)
        server = stack.enter_context(harness.serve(toml=config(extra=extra), workdir=tmp_path))
        workers = list(pids(server).values())
        client = stack.enter_context(
            closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT))
        )
        client.request("GET", "/slow")
        assert upstream.started.wait(TIMEOUT)
        server.send(signal.SIGTERM)
        server.wait_log(r"SIGTERM: draining 2 worker\(s\)", TIMEOUT)
        # The idle worker exits; the busy one waits for its request.
        poll(lambda: sum(alive(p) for p in workers) == 1 or None, "one worker drained")
        assert server.poll() is None
        upstream.release.set()
        response = client.getresponse()
        assert (response.status, response.read()) == (200, b"done")
        assert server.wait(TIMEOUT) == 0
        log = server.stop().log
    assert not any(alive(p) for p in workers)
    assert "webtorch stopped" in log and "Traceback" not in log


def test_killing_the_master_leaves_no_worker(two: Server) -> None:
    workers = list(pids(two).values())
    os.kill(two.pid, signal.SIGKILL)
    poll(lambda: not any(alive(p) for p in workers) or None, "workers gone")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", two.port), TIMEOUT).close()


def test_a_worker_that_cannot_start_stops_the_master(tmp_path: Path) -> None:
    toml = config(extra='\n[models.broken]\npath = "missing.py"\n')
    with pytest.raises(harness.HarnessError) as failed:
        harness.serve(toml=toml, workdir=tmp_path, timeout=TIMEOUT)
    assert "exited with status 2" in str(failed.value)


# A model whose forward pass, for an input starting with 7, blocks the worker's event loop (its
# compute runs on the loop) until the test's socket says go: a worker stuck in user code.
BLOCKING = """\
import socket

import torch
from torch import nn

import webtorch

PORT = {port}


class Block(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] == 7).any()):
            with socket.create_connection(("127.0.0.1", PORT)) as sock:
                sock.sendall(b"started")
                sock.recv(16)
        return x.sum(dim=1, keepdim=True)


model = webtorch.Model(
    network=Block,
    inputs=[webtorch.TensorSpec("x", "FP32", (-1, 2))],
    outputs=[webtorch.TensorSpec("y", "FP32", (-1, 1))],
)
"""


@pytest.mark.timeout(180)
def test_a_model_that_blocks_its_loop_is_replaced(tmp_path: Path) -> None:
    with ExitStack() as stack:
        gate = stack.enter_context(closing(socket.create_server(("127.0.0.1", 0))))
        gate.settimeout(TIMEOUT)
        (tmp_path / "block.py").write_text(BLOCKING.format(port=gate.getsockname()[1]))
        toml = config(heartbeat=1.0, extra='\n[models.block]\npath = "block.py"\n')
        server = stack.enter_context(
            harness.serve(toml=toml, workdir=tmp_path, timeout=harness.READY_TIMEOUT)
        )
        client = stack.enter_context(
            closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT))
        )
        stuck = worker_of(client)
        slot = next(s for s, p in pids(server).items() if p == stuck)
        client.request(
            "POST",
            "/models/block/predict",
            body=b'{"inputs": [[7, 1]]}',
            headers={"Content-Type": "application/json"},
        )
        held, _ = gate.accept()  # its loop is inside the forward pass now
        stack.enter_context(closing(held))
        assert held.recv(16) == b"started"
        server.wait_log(rf"worker {slot} \(pid {stuck}\) was stuck \(no heartbeat", TIMEOUT)
        server.wait_log(rf"worker {slot}: pid \d+ \(restarted\)", harness.READY_TIMEOUT)
        assert not alive(stuck)
        # Its client saw the connection close, nothing else.
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            client.getresponse()
        other = pids(server)
        with one_per_worker(server, set(other.values())) as conns:
            for conn in conns.values():
                conn.request(
                    "POST",
                    "/models/block/predict",
                    body=b'{"inputs": [[1, 2]]}',
                    headers={"Content-Type": "application/json"},
                )
                response = conn.getresponse()
                assert (response.status, response.read()) == (200, b'{"outputs":[[3.0]]}')


HELLO_TOTAL = re.compile(r'webtorch_http_requests_total\{[^}]*route="/hello"[^}]*\} ([\d.]+)')


def test_metrics_from_any_worker_are_the_whole_servers(two: Server) -> None:
    workers = pids(two)
    with one_per_worker(two, set(workers.values())) as conns:
        sent = {pid: 3 + 4 * slot for slot, pid in workers.items()}  # 3 and 7
        for pid, conn in conns.items():
            for _ in range(sent[pid]):
                assert get(conn, "/hello") == (200, b"v1")

        def totals() -> dict[int, str] | None:
            # Each worker's answer, once both sum every request (others' at most 1 s old).
            answers = {}
            for pid, conn in conns.items():
                status, body = get(conn, "/metrics")
                assert status == 200
                text = body.decode()
                total = HELLO_TOTAL.search(text)
                if total is None or float(total[1]) != sum(sent.values()):
                    return None
                answers[pid] = text
            return answers

        answers = poll(totals, "the whole server's total in every worker's /metrics")
    for pid, text in answers.items():
        assert "webtorch_workers 2.0" in text
        assert re.search(rf'webtorch_worker\{{pid="{pid}",slot="\d"\}} 1\.0', text)
        other = next(p for p in workers.values() if p != pid)
        assert re.search(rf'webtorch_worker\{{pid="{other}",slot="\d"\}} 0\.0', text)
