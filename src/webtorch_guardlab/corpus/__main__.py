"""``python -m webtorch_guardlab.corpus build OUT_DIR`` and ``... sources``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from webtorch_guardlab.corpus.build import HOLDOUT, Sizes, build_corpus, load_sources
from webtorch_guardlab.corpus.payloads import MissingSource, counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m webtorch_guardlab.corpus")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write train.jsonl, test.jsonl and manifest.json")
    b.add_argument("out", type=Path)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--clients", type=int, default=Sizes.clients)
    b.add_argument("--max-per-family", type=int, default=Sizes.max_per_family)
    b.add_argument("--holdout", default=",".join(HOLDOUT), help="fray families kept for test")
    b.add_argument("--fray", type=Path, help="fray package dir, unpacked wheel or .whl")
    s = sub.add_parser("sources", help="count each source's payloads per family")
    s.add_argument("--fray", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "sources":
            src = load_sources(fray=args.fray, strict=False, holdout=())
            print(
                json.dumps(
                    {
                        "counts": counts(src.train + src.test),
                        "versions": src.versions,
                        "missing": src.missing,
                    },
                    indent=1,
                    ensure_ascii=False,
                )
            )
            return 0
        holdout = tuple(f for f in args.holdout.split(",") if f)
        sizes = Sizes(clients=args.clients, max_per_family=args.max_per_family)
        m = build_corpus(args.out, args.seed, sizes, holdout=holdout, fray=args.fray)
    except MissingSource as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, c in m["splits"].items():
        print(
            f"{split}: {c['total']} requests ({c['label'].get('1', 0)} attacks), "
            f"{c['bytes'] / 1e6:.1f} MB"
        )
    print(f"built in {m['build_seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
