"""Markdown (and plain-text) reports of lab runs."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from webtorch import __version__
from webtorch_lab import analysis
from webtorch_lab.analysis import RunMetrics
from webtorch_lab.runner import ScenarioResult

MAX_UPSTREAM_COLUMNS = 16  # per-upstream shares table only up to this many upstreams
# The generator kept up when its lag's p99 stays below this: a late send is counted in the
# latency (no coordinated omission), so lag is only a problem when it grows.
KEPT_UP_S = 0.005


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    if math.isinf(seconds):
        return "fail"
    value = seconds * 1000
    if value < 10:
        return f"{value:.2f} ms"
    if value < 100:
        return f"{value:.1f} ms"
    return f"{value:.0f} ms"


def pct(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value * 100:.{digits}f}%"


def secs(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def _group_text(run: RunMetrics, result: ScenarioResult) -> str:
    groups = result.scenario.group_of()
    shares = analysis.group_shares(run.shares, groups)
    return " · ".join(f"{g} {pct(s, 0)}" for g, s in shares.items())


def _fault_cells(run: RunMetrics) -> tuple[str, str]:
    if not run.faults:
        return "", ""
    divert = ", ".join(secs(f.divert) for f in run.faults)
    recover = ", ".join(
        "-" if f.divert is None else ("n/a" if math.isinf(f.end) else secs(f.recover))
        for f in run.faults
    )
    return divert, recover


def table(result: ScenarioResult) -> list[str]:
    """The scenario's main table, one row per balancer, as markdown."""
    scenario = result.scenario
    has_faults = bool(scenario.fault_windows())
    cold = any(r.cold_rate is not None for r in result.runs)
    groups = len(scenario.upstreams) > 1
    head = ["balancer", "p50", "p99", "p99.9", "success", "retry amp."]
    if groups:
        head.append("traffic share by group")
    if has_faults:
        head += ["time to divert", "time to recover"]
    if cold:
        head.append("cold loads")
    head.append("balancer CPU")
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for run in result.runs:
        p = run.percentiles
        cells = [
            run.balancer,
            ms(p[50.0]),
            ms(p[99.0]),
            ms(p[99.9]),
            pct(run.success, 2),
            f"{run.amplification:.3f}",
        ]
        if groups:
            cells.append(_group_text(run, result))
        if has_faults:
            cells += list(_fault_cells(run))
        if cold:
            cells.append(pct(run.cold_rate))
        cells.append(pct(run.cpu.get("balancer"), 0))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def upstream_table(result: ScenarioResult) -> list[str]:
    names = result.scenario.upstream_names()
    if not result.runs or len(names) > MAX_UPSTREAM_COLUMNS:
        return []
    fair = result.scenario.fair_shares()
    rows = [
        "| balancer | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
        "| *fair share (capacity)* | " + " | ".join(f"*{pct(fair[n])}*" for n in names) + " |",
    ]
    for run in result.runs:
        rows.append(
            f"| {run.balancer} | " + " | ".join(pct(run.shares.get(n, 0.0)) for n in names) + " |"
        )
    return rows


def keep_up_line(result: ScenarioResult) -> str:
    if not result.runs:
        return "No run completed."
    worst = max(result.runs, key=lambda r: r.lag_p99)
    lab = max(r.cpu.get("lab", 0.0) for r in result.runs)
    balancer = max(r.cpu.get("balancer", 0.0) for r in result.runs)
    verdict = "kept up" if worst.lag_p99 < KEPT_UP_S else "FELL BEHIND (read latencies with care)"
    return (
        f"Load generator {verdict}: send lag p99 at most {ms(worst.lag_p99)} "
        f"(max {ms(max(r.lag_max for r in result.runs))}); the lab's CPU (upstreams + "
        f"generator) at most {pct(lab, 0)} of a core, the busiest balancer {pct(balancer, 0)}."
    )


def outcome_line(run: RunMetrics) -> str:
    parts = [f"{n:,} {k}" for k, n in sorted(run.outcomes.items())]
    return f"{run.balancer}: {run.requests:,} requests ({', '.join(parts)})"


def scenario_section(
    result: ScenarioResult,
    pictures: Sequence[Path],
    relative_to: Path,
    level: int = 2,
) -> list[str]:
    scenario = result.scenario
    h = "#" * level
    lines = [f"{h} {scenario.name}", ""]
    if scenario.description:
        lines += [scenario.description.strip(), ""]
    load = scenario.load
    rate = f"{load.rate:g} req/s" + (f" ramping to {load.ramp_to:g}" if load.ramp_to else "")
    lines += [
        f"{len(scenario.upstream_names())} upstreams, {rate} (Poisson), "
        f"{result.duration:g} s measured after {scenario.warmup:g} s of warm-up"
        + (f" (timeline x {result.scale:g})" if result.scale != 1 else "")
        + f", client timeout {load.timeout:g} s.",
        "",
        *table(result),
        "",
    ]
    per_upstream = upstream_table(result)
    if per_upstream:
        lines += ["Traffic share per upstream (requests the upstreams received):", ""]
        lines += [*per_upstream, ""]
    for picture in pictures:
        rel = os.path.relpath(picture, relative_to)
        lines += [f"![{picture.stem}]({rel})", ""]
    lines += [keep_up_line(result), ""]
    if result.skipped:
        lines += ["Not run:", ""]
        lines += [f"- {s.balancer}: {_one_line(s.reason)}" for s in result.skipped]
        lines.append("")
    lines += ["<details><summary>Outcomes</summary>", ""]
    lines += [f"- {outcome_line(run)}" for run in result.runs]
    lines += ["", "</details>", ""]
    return lines


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " / ".join(lines[:4])


METHOD = [
    "- Upstreams: simulated HTTP/1.1 servers in one process (asyncio + httptools), each with K "
    "slots and a FIFO queue, a service-time distribution, optional cold-load penalty per key, "
    "cost per KiB of request body and scripted faults; queued requests whose client left are "
    "dropped, requests in service run to their end.",
    "- Load: an open-loop generator in its own process: Poisson arrivals at the scenario's "
    "rate, a new connection whenever no idle one is free, latency counted from the intended "
    "send time (no coordinated omission); the same seeded plan for every balancer.",
    "- Balancers: fresh upstreams for each; every balancer gets the scenario's `[proxy]` "
    "settings (timeouts, tries, max_fails/fail_timeout, keep-alive pool, retries on error, "
    "timeout and 502/503/504, POST included).",
    "- Numbers: a failed request (non-2xx, error, or no answer within the timeout) counts as "
    "infinitely slow in the percentiles (`fail`); success = 2xx within the timeout; retry "
    "amplification = requests the upstreams received / requests sent; traffic shares count "
    "what the upstreams received; time to divert = fault start until the faulty upstream's "
    f"share (1 s windows) is below {analysis.DIVERTED:g}x its fair share (its part of the "
    "total capacity), time to recover = fault end until it is back to "
    f"{analysis.RECOVERED:g}x (`never`: not within the run; `-`: it was never diverted); "
    "cold loads = requests that paid a cold-load penalty / requests served; balancer CPU = "
    "its CPU time over the run's wall time (1 = a whole core).",
]


def scenario_report(result: ScenarioResult, pictures: Sequence[Path], path: Path, cmd: str) -> str:
    lines = [
        f"# Traffic lab: {result.scenario.name}",
        "",
        *header_lines(cmd, result.pinning.note),
        "",
        *scenario_section(result, pictures, path.parent, level=2),
        "## Method",
        "",
        *METHOD,
        "",
    ]
    return "\n".join(lines)


def header_lines(cmd: str, pinning: str) -> list[str]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- Command: `{cmd}`",
        f"- When: {now}; WebTorch {__version__}, Python {platform.python_version()}, "
        f"Linux {platform.release()}, {os.cpu_count()} CPUs ({pinning})",
    ]


def results_file(
    results: Sequence[tuple[ScenarioResult, Sequence[Path]]], path: Path, cmd: str, intro: str
) -> str:
    pinning = results[0][0].pinning.note if results else "n/a"
    total = sum(r.seconds for r, _ in results)
    lines = [
        "# Load-balancer results (the traffic lab)",
        "",
        intro.strip(),
        "",
        *header_lines(cmd, pinning),
        f"- Wall time: {total / 60:.1f} min for {len(results)} scenarios",
        "",
        "## Method",
        "",
        *METHOD,
        "",
    ]
    for result, pictures in results:
        lines += scenario_section(result, pictures, path.parent, level=2)
    return "\n".join(lines)


MARK_START = "<!-- lab:start -->"
MARK_END = "<!-- lab:end -->"


def replace_generated(old: str | None, generated: str) -> str:
    """``generated`` between the lab's markers; text outside the markers in ``old`` (notes
    written by hand) is kept."""
    block = f"{MARK_START}\n{generated.rstrip()}\n{MARK_END}\n"
    if old is None or MARK_START not in old or MARK_END not in old:
        return block
    before, _, rest = old.partition(MARK_START)
    _, _, after = rest.partition(MARK_END)
    return before + block + after.removeprefix("\n")


def text_table(result: ScenarioResult) -> str:
    """The main table for a terminal: the markdown rows, aligned."""
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table(result)
        if not line.startswith("|---")
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for k, row in enumerate(rows):
        out.append(
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            )
        )
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
