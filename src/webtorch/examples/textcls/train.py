"""Train the text classifier over HTTP and measure it, with pages from ``data.py``.

    python -m webtorch.examples.textcls.train --url http://127.0.0.1:8080 [--count 400]

Each train request carries ``--batch`` raw pages and their labels to ``POST
/pipelines/textcls/train``: they pass the same clean and featurize stages as predictions (no
train/serve skew), then train the model stage (write-ahead logged, answered after the step).
Accuracy is measured before and after on held-out pages (another seed) through ``POST
/pipelines/textcls/predict``. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from typing import Any

from webtorch.examples.textcls.data import CLASSES, SMALL, documents


def post(url: str, body: dict[str, Any], timeout: float = 60.0) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def accuracy(url: str, pipeline: str, count: int, seed: int, batch: int) -> float:
    docs = list(documents(count, seed, SMALL))
    right = 0
    for i in range(0, count, batch):
        chunk = docs[i : i + batch]
        outputs = post(f"{url}/pipelines/{pipeline}/predict", {"records": [d.text for d in chunk]})
        right += sum(o["label"] == d.label for o, d in zip(outputs["outputs"], chunk, strict=True))
    return right / count


def train(url: str, pipeline: str, count: int, seed: int, batch: int) -> list[float]:
    """Train on ``count`` pages; the losses the steps answered."""
    docs = list(documents(count, seed, SMALL))
    losses = []
    for i in range(0, count, batch):
        chunk = docs[i : i + batch]
        answer = post(
            f"{url}/pipelines/{pipeline}/train",
            {
                "records": [d.text for d in chunk],
                "targets": [CLASSES.index(d.label) for d in chunk],
            },
        )
        losses.append(float(answer.get("loss", float("nan"))))
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--pipeline", default="textcls")
    parser.add_argument("--count", type=int, default=400, help="pages to train on")
    parser.add_argument("--batch", type=int, default=16, help="pages per train request")
    parser.add_argument("--test", type=int, default=100, help="held-out pages")
    args = parser.parse_args(argv)
    before = accuracy(args.url, args.pipeline, args.test, 1, args.batch)
    losses = train(args.url, args.pipeline, args.count, 0, args.batch)
    after = accuracy(args.url, args.pipeline, args.test, 1, args.batch)
    print(f"accuracy on {args.test} held-out pages: {before:.2f} before, {after:.2f} after")
    print(f"loss: first step {losses[0]:.3f}, last {losses[-1]:.3f} ({len(losses)} steps)")


if __name__ == "__main__":
    main()
