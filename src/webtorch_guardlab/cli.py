"""``webtorch guard``: build the labelled corpus, train the detector, evaluate it against baselines.

webtorch guard corpus DIR            build train.jsonl / test.jsonl (needs the payload packages:
                                     see webtorch_guardlab/corpus/SOURCES.md)
webtorch guard train DIR --out F     train the detector on DIR/train.jsonl, save safetensors
webtorch guard eval DIR --model F    score DIR/test.jsonl with the detector, ModSecurity + CRS
                                     PL1 and PL2 and no defence; write GUARD_RESULTS.md
webtorch guard eval DIR --live       and live attacks on real servers (live.py, ~5 min);
                  --live-only        only those: replace that section of GUARD_RESULTS.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="guard_command", required=True)
    corpus = sub.add_parser("corpus", help="build the labelled corpus")
    corpus.add_argument("out", type=Path)
    corpus.add_argument("--seed", type=int, default=0)
    corpus.set_defaults(guard=_corpus)
    train = sub.add_parser("train", help="train the detector on a corpus")
    train.add_argument("corpus", type=Path)
    train.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    train.add_argument("--epochs", type=int, default=4)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--members", type=int, default=3, help="networks in the ensemble, folded into one (3)"
    )
    train.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="share of the benign clients held out of training to calibrate the block threshold",
    )
    train.add_argument(
        "--target-fp",
        type=float,
        default=0.001,
        help="benign false-positive share per request the block threshold is calibrated to",
    )
    train.set_defaults(guard=_train)
    ev = sub.add_parser("eval", help="evaluate the detector and its baselines")
    ev.add_argument("corpus", type=Path, nargs="?", help="corpus directory (not with --live-only)")
    ev.add_argument("--model", type=Path, help="detector weights (default: the shipped model)")
    ev.add_argument(
        "--block", type=float, help="block threshold (default: the config's, [guard] block)"
    )
    ev.add_argument("--results", type=Path, default=Path("GUARD_RESULTS.md"))
    ev.add_argument("--no-crs", action="store_true", help="skip ModSecurity + CRS")
    ev.add_argument(
        "--live", action="store_true", help="also attack live servers (floods, slow attacks, cost)"
    )
    ev.add_argument(
        "--live-only",
        action="store_true",
        help="only the live attacks; the results file's other sections are kept",
    )
    ev.set_defaults(guard=_eval)


def run(args: argparse.Namespace) -> int:
    return int(args.guard(args))


def _corpus(args: argparse.Namespace) -> int:
    from webtorch_guardlab.corpus.build import build_corpus

    build_corpus(args.out, seed=args.seed)
    print(f"corpus written to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import zlib

    from webtorch.guard.detector import save
    from webtorch.guard.scorer import Scorer
    from webtorch.guard.train import calibrate, encode_all, fit_ensemble
    from webtorch_guardlab.corpus.records import Sample, read_jsonl
    from webtorch_guardlab.dataset import api_examples, augmented, examples

    started = time.perf_counter()
    everything, all_samples = examples(read_jsonl(args.corpus / "train.jsonl"))
    # Whole benign clients held out (never requests of a client on both sides), to calibrate
    # the block threshold on traffic the detector did not train on; every attack trains.
    cut = int(args.holdout * 100)

    train, samples, check = [], [], []
    for example, sample in zip(everything, all_samples, strict=True):
        if sample.label == 0 and zlib.crc32(sample.client.encode()) % 100 < cut:
            check.append(example)
        else:
            train.append(example)
            samples.append(sample)
    # The API's requests are benign hosts for the transplanted attacks too: they go along as
    # samples of the benign label.
    hosts = [Sample("GET", "/", (), b"", 0, "benign", "api", "", 0.0, "train")] * (len(train) // 5)
    datasets = []
    for member in range(args.members):
        # Each member its own draw of the API traffic and of the augmentation: members that saw
        # different transplants disagree where the data is thin, which is what averaging fixes.
        api = api_examples(len(hosts), args.seed + member)
        datasets.append(
            encode_all(augmented([*train, *api], [*samples, *hosts], args.seed + member))
        )
    net = fit_ensemble(datasets, epochs=args.epochs, seed=args.seed)
    metadata = {"corpus": str(args.corpus), "examples": str(sum(map(len, datasets)))}
    if check:
        scorer = Scorer.from_net(net)
        scores = [max(scorer.score_one(e.view, list(e.client))) for e in check]
        block = calibrate(scores, args.target_fp)
        metadata.update(block=f"{block:.4f}", calibrated_on=f"{len(check)} held-out requests")
        print(
            f"block threshold for <= {args.target_fp:.2%} false positives on {len(check)} "
            f"held-out benign requests: {block:.4f}"
        )
    save(net, args.out, metadata)
    elapsed = time.perf_counter() - started
    print(f"trained on {metadata['examples']} requests in {elapsed:.1f} s -> {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from webtorch.config import GuardConfig
    from webtorch.guard.build import DEFAULT_MODEL
    from webtorch.guard.scorer import Scorer
    from webtorch_guardlab import evaluate
    from webtorch_guardlab.corpus.records import read_jsonl
    from webtorch_guardlab.dataset import examples

    if args.live_only:
        results: Path = args.results
        return _live(args, results.read_text() if results.exists() else "# Guard results\n")
    if args.corpus is None:
        print("error: a corpus directory is needed (or --live-only)", file=sys.stderr)
        return 2
    model = args.model or DEFAULT_MODEL
    test, samples = examples(read_jsonl(args.corpus / "test.jsonl"))
    block = GuardConfig().block if args.block is None else args.block
    thresholds = sorted({0.5, 0.9, 0.97, 0.99, block})
    detections = [
        evaluate.nothing(samples),
        *evaluate.webtorch(Scorer.from_file(model), test, thresholds),
    ]
    if not args.no_crs:
        from webtorch_guardlab.baselines.crs import unavailable

        problem = unavailable()
        if problem is not None:
            print(f"error: ModSecurity + CRS cannot run here: {problem}", file=sys.stderr)
            return 1
        for level in (1, 2):
            print(f"CRS PL{level} on {len(samples)} requests...", file=sys.stderr)
            detections.append(evaluate.crs(level, samples))
    command = "webtorch " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = evaluate.report(detections, samples)
    section = f"## Detection on the corpus\n\nCommand: `{command}`\n\n{text}\n"
    print(section)
    text = f"# Guard results\n\n{section}"
    if args.results.exists():  # the live section of an earlier --live run is kept
        from webtorch_guardlab.live import carry_live_section

        text = carry_live_section(args.results.read_text(), text)
    args.results.write_text(text)
    print(f"written to {args.results}", file=sys.stderr)
    if args.live:
        return _live(args, text)
    return 0


def _live(args: argparse.Namespace, text: str) -> int:
    """Run the live attacks; write ``text`` with its live section replaced by theirs."""
    from webtorch_guardlab import live

    command = "webtorch " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    section = live.live_report(live.run_live(), command)
    print(section)
    args.results.write_text(live.merge_section(text, section))
    print(f"written to {args.results}", file=sys.stderr)
    return 0
