"""Runs a scenario: for each balancer, fresh simulated upstreams, the balancer as a subprocess,
the open-loop load through it, then the numbers.

One :class:`Lab` holds the two helper processes (simulated upstreams; load generator) for all
its runs, so that a run pays only for starting its balancer. The balancer runs on a CPU of its
own, the helpers and this runner on the other (``procs.Pinning``).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webtorch_harness as harness
from webtorch_lab import balancers, procs
from webtorch_lab.analysis import RunMetrics, analyse
from webtorch_lab.procs import LabError, Pinning
from webtorch_lab.records import Records
from webtorch_lab.scenario import BalancerSpec, Scenario

START_TIMEOUT = 90.0  # seconds a balancer gets to listen (importing torch on a busy machine)
PROXY_TIMEOUT = 15.0  # seconds it then gets to proxy its first request
LEAD_S = 0.3  # between telling the helpers the start time and the warm-up's start


@dataclass
class Skipped:
    balancer: str
    reason: str
    failed: bool = False  # it should have run (False: it cannot run here, e.g. unknown policy)


@dataclass
class ScenarioResult:
    scenario: Scenario
    scale: float
    runs: list[RunMetrics] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    pinning: Pinning = field(default_factory=Pinning)
    seconds: float = 0.0  # wall time of the whole scenario

    @property
    def duration(self) -> float:
        return self.scenario.duration * self.scale


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def run_seconds(scenario: Scenario, scale: float) -> float:
    """The load's wall time of one run: warm-up, measured period, last timeout."""
    return scenario.warmup + scenario.duration * scale + scenario.load.timeout


class Progress:
    """Seconds of load done out of the planned total, for a progress bar (tqdm by default)."""

    def __init__(self, total: float, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=round(total, 1),
            unit="s",
            disable=not enabled,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of load "
            "[{elapsed}<{remaining}]",
        )
        self.base = 0.0

    def begin(self, label: str) -> None:
        self.bar.set_description_str(label)

    def at(self, seconds: float) -> None:
        self.bar.n = round(min(self.base + seconds, float(self.bar.total or 0)), 1)
        self.bar.refresh()

    def done(self, seconds: float) -> None:
        self.base += seconds
        self.at(0.0)

    def close(self) -> None:
        self.bar.close()


class Lab:
    """The helpers shared by every run; use as a context manager."""

    def __init__(self, workdir: Path, pinning: Pinning | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.pinning = pinning if pinning is not None else procs.choose_pinning()
        self.sim = procs.Helper("webtorch_lab.sim", workdir / "sim.log", self.pinning)
        self.generator = procs.Helper(
            "webtorch_lab.generator", workdir / "generator.log", self.pinning
        )

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sim.close()
        self.generator.close()

    # -- one scenario -----------------------------------------------------------------------

    def run_scenario(
        self,
        scenario: Scenario,
        scale: float = 1.0,
        balancer_specs: Sequence[BalancerSpec] | None = None,
        raw: Path | None = None,
        progress: Progress | None = None,
        log: Callable[[str], None] = print,
    ) -> ScenarioResult:
        specs = list(balancer_specs if balancer_specs is not None else scenario.balancers)
        result = ScenarioResult(scenario, scale, pinning=self.pinning)
        started = time.monotonic()
        rundir = raw if raw is not None else self.workdir / "runs"
        for spec in specs:
            where = rundir / slug(scenario.name) / slug(spec.name)
            where.mkdir(parents=True, exist_ok=True)
            if progress is not None:
                progress.begin(f"{scenario.name}: {spec.name}")
            try:
                metrics = self.run_one(scenario, spec, scale, where, progress)
            except Skip as skip:
                result.skipped.append(Skipped(spec.name, str(skip)))
                log(f"{scenario.name}: {spec.name} skipped: {skip}")
            except LabError as exc:
                result.skipped.append(Skipped(spec.name, f"failed: {exc}", failed=True))
                log(f"{scenario.name}: {spec.name} failed: {exc}")
            else:
                result.runs.append(metrics)
            if progress is not None:
                progress.done(run_seconds(scenario, scale))
        result.seconds = time.monotonic() - started
        return result

    def run_one(
        self,
        scenario: Scenario,
        spec: BalancerSpec,
        scale: float,
        where: Path,
        progress: Progress | None = None,
    ) -> RunMetrics:
        scenario_json = scenario.model_dump(mode="json")
        seed = scenario.seed
        if spec.kind == "nginx" and (problem := balancers.nginx_problem(spec.policy)):
            raise Skip(problem)
        ports: dict[str, int] = self.sim.ask(
            {"cmd": "up", "scenario": scenario_json, "scale": scale, "seed": seed}, timeout=30
        )["ports"]
        try:
            with self.balancer(scenario, spec, ports, where) as (port, balancer_pids):
                t0 = time.monotonic() + LEAD_S + scenario.warmup
                self.sim.ask({"cmd": "start", "t0": t0}, timeout=10)
                lab_cpu = self.sim.cpu() + self.generator.cpu()
                balancer_cpu = harness.cpu_times(balancer_pids()).total
                begun = time.monotonic()
                records_path = where / "records.csv"

                def tick() -> None:
                    if progress is not None:
                        progress.at(time.monotonic() - begun)

                summary = self.generator.ask(
                    {
                        "cmd": "run",
                        "scenario": scenario_json,
                        "scale": scale,
                        "seed": seed,
                        "port": port,
                        "t0": t0,
                        "out": str(records_path),
                    },
                    timeout=run_seconds(scenario, scale) + 60,
                    tick=tick,
                )["done"]
                # CPU over the load (warm-up included): the balancer's, and the lab side's.
                wall = time.monotonic() - begun
                balancer_use = (harness.cpu_times(balancer_pids()).total - balancer_cpu) / wall
                lab_use = (self.sim.cpu() + self.generator.cpu() - lab_cpu) / wall
        finally:
            stats: dict[str, Any] = self.sim.ask({"cmd": "stop"}, timeout=30)["stats"]
        (where / "upstreams.json").write_text(_json(stats))
        metrics = analyse(
            spec.name,
            Records.read(records_path),
            stats,
            duration=scenario.duration * scale,
            timeout=scenario.load.timeout,
            fair=scenario.fair_shares(),
            faults=scenario.fault_windows(scale),
            cold=any(g.cold_penalty > 0 for g in scenario.upstreams) and scenario.load.keys > 0,
        )
        metrics.cpu = {"balancer": balancer_use, "lab": lab_use}
        metrics.lag_p99 = float(summary["lag_p99"])
        metrics.lag_max = float(summary["lag_max"])
        return metrics

    # -- the balancer process ---------------------------------------------------------------

    @contextmanager
    def balancer(
        self, scenario: Scenario, spec: BalancerSpec, ports: dict[str, int], where: Path
    ) -> Iterator[tuple[int, Callable[[], list[int]]]]:
        """Start the balancer (webtorch_harness); yield its port and a function listing its
        processes."""
        log_path = where / "balancer.log"
        cpus = self.pinning.balancer or None
        try:
            if spec.kind == "webtorch":
                proc = self._webtorch(scenario, spec, ports, where, log_path, cpus)
            else:
                proc = self._nginx(scenario, spec, ports, where, log_path, cpus)
        except harness.HarnessError as exc:
            raise LabError(f"balancer: {exc}") from None
        with proc:
            try:
                # Until GET /health through the balancer reaches an upstream and comes back 200.
                proc.wait_http("/health", timeout=PROXY_TIMEOUT)
            except harness.HarnessError as exc:
                raise LabError(f"balancer does not proxy: {exc}") from None
            assert proc.port is not None
            yield proc.port, proc.pids

    def _webtorch(
        self,
        scenario: Scenario,
        spec: BalancerSpec,
        ports: dict[str, int],
        where: Path,
        log_path: Path,
        cpus: str | None,
    ) -> harness.Process:
        """``webtorch serve``, once it prints the port it got (its config asks for port 0)."""
        config_path = where / "webtorch.toml"
        config_path.write_text(balancers.webtorch_config(scenario, spec, ports))
        problem = balancers.webtorch_problem(config_path)
        if problem is not None:
            raise Skip(problem)
        return harness.serve(
            config_path,
            workdir=where,
            log=log_path,
            cpus=cpus,
            listen=None,
            command=balancers.webtorch_command(),
            timeout=START_TIMEOUT,
        )

    def _nginx(
        self,
        scenario: Scenario,
        spec: BalancerSpec,
        ports: dict[str, int],
        where: Path,
        log_path: Path,
        cpus: str | None,
    ) -> harness.Process:
        """nginx on a port chosen before (it cannot report one it got for port 0), once it
        accepts a connection."""
        port = harness.free_port()
        config_path = where / "nginx.conf"
        config_path.write_text(balancers.nginx_config(scenario, spec, ports, port, where.resolve()))
        argv = balancers.nginx_argv(config_path, where.resolve())
        proc = harness.start(argv, log=log_path, cpus=cpus, port=port, name="nginx")
        try:
            proc.wait_for(lambda: True if _accepts(port) else None, "listening", START_TIMEOUT)
        except BaseException:
            proc.close()
            raise
        return proc


class Skip(Exception):
    """This balancer cannot run here; the message says why."""


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _json(data: Any) -> str:
    import json

    return json.dumps(data, indent=1, sort_keys=True)


@contextmanager
def workdir(keep: Path | None = None) -> Iterator[Path]:
    """A scratch directory for helper logs (removed afterwards unless ``keep`` is given)."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    tmp = Path(tempfile.mkdtemp(prefix="webtorch-lab-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
