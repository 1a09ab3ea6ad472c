"""Processes of the lab: CPU pinning and the helpers spoken to in JSON lines (the balancer
itself, like every server the tools start, runs through webtorch_harness).

The balancer under test gets a core of its own and everything else (simulated upstreams, load
generator, this runner) the other, with ``taskset``, when the machine has two cores and the tool
exists; otherwise nothing is pinned and the report says so.
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

import webtorch_harness as harness

STOP_TIMEOUT = 5.0  # seconds a process gets to exit on SIGTERM before SIGKILL


class LabError(Exception):
    """A run could not be done; the message says why."""


def raise_open_files() -> None:
    """Lift the soft limit on open files to the hard one: an open-loop client under a black
    hole holds a connection per request for a whole timeout."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the balancer and the rest run on; empty: not pinned."""

    balancer: str = ""
    lab: str = ""

    @property
    def note(self) -> str:
        if not self.balancer:
            return "not pinned (needs two CPUs and taskset)"
        return f"balancer on CPU {self.balancer}; upstreams, generator and runner on CPU {self.lab}"

    def pin_self(self) -> None:
        """Put the calling process (the runner) on the lab's CPU."""
        if self.lab:
            os.sched_setaffinity(0, {int(self.lab)})

    def wrap(self, argv: Sequence[str], balancer: bool) -> list[str]:
        cpu = self.balancer if balancer else self.lab
        return ["taskset", "-c", cpu, *argv] if cpu else list(argv)


def choose_pinning() -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return Pinning()
    return Pinning(str(cpus[0]), str(cpus[1]))


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Helper:
    """A Python module run as a child that answers JSON commands with JSON lines (the lab's
    simulated upstreams and load generator), kept for many runs."""

    def __init__(self, module: str, log: Path, pinning: Pinning) -> None:
        self.module = module
        self.log = log
        argv = pinning.wrap([sys.executable, "-m", module], balancer=False)
        self._log_file: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            start_new_session=True,
        )
        self.selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)

    def ask(
        self,
        command: dict[str, Any],
        timeout: float,
        tick: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Send one command and wait for its answer line, calling ``tick`` about every 0.2 s."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(orjson.dumps(command) + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise LabError(f"{self.module} exited:\n{log_tail(self.log)}") from None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"{self.module}: no answer within {timeout:.0f} s")
            if self.selector.select(min(0.2, left)):
                line = self.proc.stdout.readline()
                if not line:
                    raise LabError(f"{self.module} exited:\n{log_tail(self.log)}")
                answer: dict[str, Any] = orjson.loads(line)
                if "error" in answer:
                    raise LabError(f"{self.module}: {answer['error']}")
                return answer
            if tick is not None:
                tick()

    def cpu(self) -> float:
        return harness.cpu_times([self.proc.pid]).total

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(STOP_TIMEOUT)  # a closed stdin is its sign to exit
        except subprocess.TimeoutExpired:
            harness.stop_session(self.proc, timeout=STOP_TIMEOUT)
        self.selector.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log_file.close()


def reply(message: Mapping[str, Any]) -> None:
    """Answer the runner: one JSON line on stdout (the helper processes' protocol)."""
    sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
    sys.stdout.flush()


def serve_helper(commands: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """A helper process's main: more open files, then its command loop on uvloop."""
    import uvloop

    raise_open_files()
    uvloop.run(commands())
