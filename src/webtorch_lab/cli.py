"""``webtorch lab``: run traffic scenarios against balancers and report.

    webtorch lab SCENARIO [--balancers B,...] [--out DIR] [--duration-scale F]
    webtorch lab --all [--results LB_RESULTS.md]
    webtorch lab --list

SCENARIO is a scenario file or the name of a shipped one (``--list`` names them). A balancer is
``webtorch:POLICY`` (any policy name ``webtorch serve`` accepts; a bare POLICY means that) or
``nginx:round_robin|least_conn|random2|hash``.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from webtorch.errors import ConfigError
from webtorch_lab import report, runner
from webtorch_lab import scenario as scenarios
from webtorch_lab.scenario import BalancerSpec, Scenario

RESULTS_INTRO = """\
Written by `webtorch lab --all` (see the README's "Traffic lab"): every shipped scenario
(`src/webtorch_lab/scenarios/`), each balancer in turn against fresh simulated upstreams and the
same seeded open-loop load. The machine is shared and noisy: compare balancers within a
scenario, not absolute numbers across runs. Pictures are in `lb_results/`.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", nargs="?", help="scenario file, or a shipped scenario's name")
    parser.add_argument("--all", action="store_true", help="run every shipped scenario")
    parser.add_argument("--list", action="store_true", help="list the shipped scenarios")
    parser.add_argument(
        "--balancers",
        help="comma-separated webtorch:POLICY / nginx:VARIANT (default: the scenario's list)",
    )
    parser.add_argument("--out", type=Path, help="directory for reports and pictures")
    parser.add_argument(
        "--results", type=Path, help="with --all: the results file to write (e.g. LB_RESULTS.md)"
    )
    parser.add_argument(
        "--duration-scale",
        type=float,
        default=1.0,
        help="multiply every scenario's timeline (duration, fault times) by this",
    )
    parser.add_argument("--raw", type=Path, help="keep each run's records, configs and logs here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_balancers(text: str) -> list[BalancerSpec]:
    specs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if ":" not in item:
            item = f"webtorch:{item}"
        try:
            specs.append(BalancerSpec.model_validate(item))
        except ValueError as exc:
            raise ConfigError(f"--balancers: {exc}") from None
    if not specs:
        raise ConfigError("--balancers: no balancer named")
    return specs


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds: balancers and helpers are stopped on the way out


def run(args: argparse.Namespace) -> int:
    if args.list:
        for path in scenarios.shipped():
            loaded = scenarios.load(path)
            text = " ".join(loaded.description.split())
            print(f"{path.stem:16} {text[:100] + '...' if len(text) > 103 else text}")
        return 0
    if args.duration_scale <= 0:
        raise ConfigError("--duration-scale must be above 0")
    if args.all == bool(args.scenario):
        raise ConfigError("name one SCENARIO, or --all")
    if args.results is not None and not args.all:
        raise ConfigError("--results goes with --all")
    paths = scenarios.shipped() if args.all else [scenarios.find(args.scenario)]
    chosen = [scenarios.load(p) for p in paths]
    override = parse_balancers(args.balancers) if args.balancers else None
    if args.all:
        results_path = args.results or Path("LB_RESULTS.md")
        out = args.out or results_path.parent / "lb_results"
    else:
        results_path = None
        out = args.out or Path("webtorch-lab")
    out.mkdir(parents=True, exist_ok=True)
    cmd = "webtorch " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        done = run_scenarios(chosen, override, args, out)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if results_path is not None:
        generated = report.results_file(done, results_path, cmd, RESULTS_INTRO)
        old = results_path.read_text() if results_path.exists() else None
        results_path.write_text(report.replace_generated(old, generated))
        print(f"wrote {results_path}")
    else:
        result, pictures = done[0]
        path = out / f"{result.scenario.name}.md"
        path.write_text(report.scenario_report(result, pictures, path, cmd))
        print(f"wrote {path}")
    failed = any(s.failed for r, _ in done for s in r.skipped)
    return 1 if failed or not any(r.runs for r, _ in done) else 0


def run_scenarios(
    loaded: list[Scenario],
    override: list[BalancerSpec] | None,
    args: argparse.Namespace,
    out: Path,
) -> list[tuple[runner.ScenarioResult, list[Path]]]:
    from webtorch_lab.plots import plot_scenario  # matplotlib: only when the lab runs

    scale = args.duration_scale
    total = sum(
        runner.run_seconds(s, scale) * len(override if override is not None else s.balancers)
        for s in loaded
    )
    done = []
    started = time.monotonic()
    progress = runner.Progress(total, enabled=not args.no_progress)
    try:
        with runner.workdir(args.raw) as work, runner.Lab(work) as lab:
            lab.pinning.pin_self()
            for scenario in loaded:
                result = lab.run_scenario(
                    scenario,
                    scale,
                    override,
                    raw=args.raw,
                    progress=progress,
                    log=progress.bar.write,
                )
                pictures = plot_scenario(result, out)
                done.append((result, pictures))
                progress.bar.write(f"\n{scenario.name} ({result.seconds:.0f} s)")
                progress.bar.write(report.text_table(result) if result.runs else "(no run)")
                progress.bar.write(report.keep_up_line(result) + "\n")
    finally:
        progress.close()
    print(f"{len(loaded)} scenario(s) in {(time.monotonic() - started) / 60:.1f} min")
    return done
