"""``webtorch guard eval``, offline part: the detector and its baselines on the corpus's test split.

Every detector sees the same requests: the test split, built from payload lists the detector never
trained on (sqlmap, wapiti, wfuzz), fray's held-out families, and benign clients it never saw.
Reported per detector: detection rate per attack family, the benign false-positive rate per
request and per client, precision at a realistic 1 % attack share, and the cost per request.

Baselines: no defence (flags nothing), and ModSecurity with the OWASP Core Rule Set at paranoia
levels 1 and 2, run in-process (``baselines/crs.py``), given the site settings an operator would:
the methods and content types the site uses.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from webtorch.guard.scorer import Scorer
from webtorch.guard.train import Example
from webtorch_guardlab.corpus.records import Sample

CRS_SITE_SETUP = """
SecAction "id:900200,phase:1,nolog,pass,setvar:'tx.allowed_methods=GET HEAD POST OPTIONS PUT DELETE PATCH'"
"""  # noqa: E501 (one ModSecurity directive)
ATTACK_SHARE = 0.01  # the share of attacks at which precision is quoted


@dataclass
class Detection:
    name: str
    flagged: np.ndarray  # bool per test sample
    seconds_per_request: float
    note: str = ""


def webtorch(
    scorer: Scorer, examples: Sequence[Example], thresholds: Sequence[float]
) -> list[Detection]:
    """The detector at each block threshold (the requests are scored once)."""
    scores = np.zeros(len(examples))
    started = time.perf_counter()
    for i, example in enumerate(examples):
        scores[i] = max(scorer.score_one(example.view, list(example.client)))
    per_request = (time.perf_counter() - started) / len(examples)
    return [
        Detection(f"WebTorch guard (block at {t:g})", scores >= t, per_request) for t in thresholds
    ]


def crs(level: int, samples: Sequence[Sample]) -> Detection:
    from webtorch_guardlab.baselines.crs import CRS

    engine = CRS(level, setup=CRS_SITE_SETUP)
    flagged = np.zeros(len(samples), dtype=bool)
    started = time.perf_counter()
    for i, s in enumerate(samples):
        verdict = engine.inspect(s.method, s.target, s.headers, s.body, client_ip=s.client)
        flagged[i] = verdict.blocked
    elapsed = time.perf_counter() - started
    return Detection(f"ModSecurity + CRS 3.3.4, PL{level}", flagged, elapsed / len(samples))


def nothing(samples: Sequence[Sample]) -> Detection:
    return Detection("no defence", np.zeros(len(samples), dtype=bool), 0.0)


@dataclass
class Scores:
    detection: float  # all attacks
    injection: float  # attacks other than scans
    fp_request: float
    fp_client: float
    precision: float
    by_family: dict[str, tuple[float, int]]


def score(detection: Detection, samples: Sequence[Sample]) -> Scores:
    flagged = detection.flagged
    attack = np.array([s.label == 1 for s in samples])
    scan = np.array([s.family == "scan" for s in samples])
    benign = ~attack
    tpr = float(flagged[attack].mean()) if attack.any() else 0.0
    fpr = float(flagged[benign].mean()) if benign.any() else 0.0
    clients: dict[str, bool] = defaultdict(bool)
    for s, hit in zip(samples, flagged, strict=True):
        if s.label == 0:
            clients[s.client] |= bool(hit)
    by_family: dict[str, tuple[float, int]] = {}
    families = np.array([s.family for s in samples])
    for family in sorted(set(families[attack])):
        mask = families == family
        by_family[family] = (float(flagged[mask].mean()), int(mask.sum()))
    injection = attack & ~scan
    positives = tpr * ATTACK_SHARE
    negatives = fpr * (1 - ATTACK_SHARE)
    return Scores(
        detection=tpr,
        injection=float(flagged[injection].mean()) if injection.any() else 0.0,
        fp_request=fpr,
        fp_client=sum(clients.values()) / max(len(clients), 1),
        precision=positives / (positives + negatives) if positives + negatives > 0 else 0.0,
        by_family=by_family,
    )


def report(detections: Sequence[Detection], samples: Sequence[Sample]) -> str:
    scores = [score(d, samples) for d in detections]
    attacks = sum(s.label for s in samples)
    benign_clients = len({s.client for s in samples if s.label == 0})
    lines = [
        f"Test split: {len(samples)} requests, {attacks} attacks, "
        f"{len(samples) - attacks} benign from {benign_clients} clients.",
        "",
        "| Detector | Injection detected | All attacks detected | Benign FP / request "
        "| Benign clients with an FP | Precision at 1 % attacks | Cost / request |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for d, s in zip(detections, scores, strict=True):
        lines.append(
            f"| {d.name} | {s.injection:.1%} | {s.detection:.1%} | {s.fp_request:.3%} "
            f"| {s.fp_client:.1%} | {s.precision:.1%} | {d.seconds_per_request * 1e6:,.0f} µs |"
        )
    families = sorted({f for s in scores for f in s.by_family})
    lines += [
        "",
        "Detection rate per attack family (requests in the test split):",
        "",
        "| Family | n | " + " | ".join(d.name for d in detections) + " |",
        "|---|--:|" + "--:|" * len(detections),
    ]
    for family in families:
        n = next(s.by_family[family][1] for s in scores if family in s.by_family)
        rates = [f"{s.by_family.get(family, (0.0, 0))[0]:.1%}" for s in scores]
        lines.append(f"| {family} | {n} | " + " | ".join(rates) + " |")
    return "\n".join(lines)
