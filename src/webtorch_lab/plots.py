"""The report's pictures, with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after use("Agg"): no display needed

from webtorch_lab.analysis import RunMetrics
from webtorch_lab.runner import ScenarioResult

NINES = (0.0, 0.9, 0.99, 0.999, 0.9999)


def _nines(p: float) -> float:
    return -math.log10(max(1e-6, 1.0 - p))


def latency_curve(result: ScenarioResult, path: Path) -> Path:
    """Latency against percentile (the tail stretched: 90, 99, 99.9...), one line per balancer;
    a line stops where failures begin (a failure counts as infinitely slow)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    timeout_ms = result.scenario.load.timeout * 1000
    for run in result.runs:
        n = len(run.latencies)
        xs, ys = [], []
        for i, latency in enumerate(run.latencies):
            if not math.isfinite(latency):
                break
            xs.append(_nines((i + 0.5) / n))
            ys.append(max(latency * 1000, 0.01))
        ax.plot(xs, ys, label=f"{run.balancer} ({run.success:.1%} ok)", linewidth=1.4)
    ax.axhline(timeout_ms, color="grey", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks([_nines(p) for p in NINES])
    ax.set_xticklabels([f"{p * 100:g}" for p in NINES])
    ax.set_xlim(0, _nines(NINES[-1]))
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms, log scale); dotted: the client's timeout")
    ax.set_title(f"{result.scenario.name}: latency by percentile")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _group_means(run: RunMetrics, groups: dict[str, list[str]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for group, names in groups.items():
        columns = [run.share_series[n] for n in names if n in run.share_series]
        if not columns:
            continue
        out[group] = [
            sum(c[i] for c in columns) / len(columns)
            if not any(math.isnan(c[i]) for c in columns)
            else math.nan
            for i in range(len(run.times))
        ]
    return out


def share_over_time(result: ScenarioResult, path: Path) -> Path:
    """One panel per balancer: the traffic share of one upstream of each group (the group's
    mean), its fair share dashed, fault windows shaded."""
    scenario = result.scenario
    groups = {g.name: g.names() for g in scenario.upstreams}
    fair = scenario.fair_shares()
    runs: Sequence[RunMetrics] = result.runs
    cols = min(3, max(1, len(runs)))
    rows = max(1, math.ceil(len(runs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    windows = result.scenario.fault_windows(result.scale)
    top = max(fair.values()) * 2.2
    for index, run in enumerate(runs):
        ax = axes[index // cols][index % cols]
        for k, (group, series) in enumerate(_group_means(run, groups).items()):
            colour = colours[k % len(colours)]
            count = len(groups[group])
            label = group if count == 1 else f"{group} (each of {count})"
            ax.plot(run.times, series, color=colour, linewidth=1.2, label=label)
            fair_each = sum(fair[n] for n in groups[group]) / count
            ax.axhline(fair_each, color=colour, linestyle="--", linewidth=0.8, alpha=0.7)
            top = max(top, *(v for v in series if not math.isnan(v)), 0.0)
        for _, fault in windows:
            end = fault.end if math.isfinite(fault.end) else result.duration
            ax.axvspan(fault.start, end, color="red", alpha=0.08)
        ax.set_title(run.balancer, fontsize=9)
        ax.set_xlim(0, result.duration)
        ax.set_ylim(0, min(1.0, top * 1.05))
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if index == 0:
            ax.legend(fontsize=7)
    for index in range(len(runs), rows * cols):
        axes[index // cols][index % cols].set_visible(False)
    fig.suptitle(
        f"{scenario.name}: traffic share per upstream over time (1 s windows; "
        "dashed: fair share; shaded: faults)",
        fontsize=10,
    )
    fig.supxlabel("seconds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_scenario(result: ScenarioResult, out: Path) -> list[Path]:
    """Both pictures of one scenario into ``out``; their paths."""
    if not result.runs:
        return []
    out.mkdir(parents=True, exist_ok=True)
    name = result.scenario.name
    return [
        latency_curve(result, out / f"{name}-latency.png"),
        share_over_time(result, out / f"{name}-share.png"),
    ]
