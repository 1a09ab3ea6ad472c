"""``python -m webtorch_lab.heldout``: the policies on generated cases (``families.py``),
relative to the best classic policy per case.

For each case every policy runs on the offline simulator (fake clock, the client's timeout),
and its p99, p99.9 and success are divided by the best of ``peak_ewma``, ``least_conn`` and
``prequal`` on that case. Prints a markdown report (the LB_RESULTS.md section).

    python -m webtorch_lab.heldout [--seeds N] [--tuning] [--policies a,b] [--cases-out F]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from webtorch.balance.base import Upstream
from webtorch.balance.registry import make_policy
from webtorch_lab.families import FAMILIES, HELD_OUT_FAMILIES, Case, make_case, split
from webtorch_lab.model import UpstreamModel
from webtorch_lab.offline import OfflineResult, run_offline

CLASSIC = ("peak_ewma", "least_conn", "prequal")


def run_case(case: Case, policy_name: str) -> OfflineResult:
    count = len(case.upstreams)
    ups = [Upstream(f"10.0.0.{i}:80", f"10.0.0.{i}", 80, index=i) for i in range(count)]
    models = [
        UpstreamModel(p, random.Random(f"{case.family}:{case.seed}:model:{i}"))
        for i, p in enumerate(case.upstreams)
    ]
    torch.manual_seed(case.seed)
    policy = make_policy(
        policy_name,
        ups,
        hash_key="header:x-key" if case.keyed and policy_name == "learned" else None,
        rng=random.Random(f"{case.seed}:policy"),
        train_in_thread=False,
    )
    try:
        return run_offline(policy, ups, models, case.load, timeout=case.timeout)
    finally:
        if policy_name == "learned":
            policy.close()


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


Score = tuple[float, float, float]  # client p99, p99.9 (seconds), success


@dataclass
class Row:
    family: str
    seed: int
    note: str
    scores: dict[str, Score] = field(default_factory=dict)


def evaluate(pairs: Sequence[tuple[str, int]], policies: Sequence[str]) -> list[Row]:
    rows: list[Row] = []
    for family, seed in pairs:
        case = make_case(family, seed)
        row = Row(family, seed, case.note)
        for name in policies:
            result = run_case(case, name)
            row.scores[name] = (
                result.client_percentile(0.99),
                result.client_percentile(0.999),
                result.success,
            )
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)
    return rows


def _line(row: Row) -> str:
    parts = [f"{row.family}:{row.seed}"]
    for name, (p99, p999, ok) in row.scores.items():
        parts.append(f"{name}={p99 * 1e3:.0f}/{p999 * 1e3:.0f}ms/{ok:.4f}")
    return " ".join(parts)


def ratios(row: Row, name: str) -> Score:
    """(p99, p99.9) over the best classic's, and success minus the best classic's."""
    classic = [row.scores[c] for c in CLASSIC if c in row.scores]
    best99 = min(c[0] for c in classic)
    best999 = min(c[1] for c in classic)
    best_ok = max(c[2] for c in classic)
    p99, p999, ok = row.scores[name]
    return p99 / max(best99, 1e-9), p999 / max(best999, 1e-9), ok - best_ok


def report(rows: list[Row], policies: Sequence[str]) -> str:
    out = [
        "| policy | family | cases | p99 / best: median | p90 | max | <= 1.1x | "
        "p99.9 / best: median | max | success - best: min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    families = [f for f in FAMILIES if any(r.family == f for r in rows)]
    for name in policies:
        for family in [*families, "all"]:
            chosen = [r for r in rows if family in ("all", r.family)]
            rs = [ratios(r, name) for r in chosen]
            r99 = [r[0] for r in rs]
            r999 = [r[1] for r in rs]
            within = sum(x <= 1.1 for x in r99) / len(r99)
            held = " (held-out family)" if family in HELD_OUT_FAMILIES else ""
            out.append(
                f"| {name} | {family}{held} | {len(rs)} | {statistics.median(r99):.2f} | "
                f"{_quantile(r99, 0.9):.2f} | {max(r99):.2f} | {within:.0%} | "
                f"{statistics.median(r999):.2f} | {max(r999):.2f} | "
                f"{min(r[2] for r in rs):+.4f} |"
            )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, default=5, help="cases per family")
    parser.add_argument("--tuning", action="store_true", help="the tuning split, not held-out")
    parser.add_argument("--policies", default="learned,peak_ewma,least_conn,prequal")
    parser.add_argument("--families", help="only these (comma-separated)")
    args = parser.parse_args(argv)
    policies = args.policies.split(",")
    pairs = split(args.seeds, held_out=not args.tuning)
    if args.families:
        pairs = [p for p in pairs if p[0] in args.families.split(",")]
    torch.set_num_threads(1)
    started = time.monotonic()
    rows = evaluate(pairs, policies)
    print(report(rows, policies))
    print(f"\n{len(rows)} cases in {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
