"""Training the guard's detector with PyTorch: offline from a labelled corpus, and online from
operator feedback. Both go through :func:`fit`, which takes encoded examples (``detector.encode``)
with two labels each (injection, abuse) and returns the trained network."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from webtorch.guard.detector import HEADS, GuardNet, encode, merge
from webtorch.guard.features import N_FLAGS, N_REQUEST, RequestView


@dataclass(frozen=True)
class Example:
    view: RequestView
    client: Sequence[float]  # the client's history features when the request arrived
    injection: float  # labels: 1.0 attack, 0.0 benign, per head
    abuse: float


@dataclass(frozen=True)
class Encoded:
    ids: list[np.ndarray]  # per field
    numeric: np.ndarray
    labels: np.ndarray  # (len(HEADS),)


def encode_all(examples: Sequence[Example]) -> list[Encoded]:
    out = []
    for example in examples:
        ids, numeric = encode(example.view, example.client)
        labels = np.asarray([example.injection, example.abuse], dtype=np.float32)
        out.append(Encoded(ids, numeric, labels))
    return out


def _batch(items: Sequence[Encoded]) -> tuple[torch.Tensor, ...]:
    bags = [field for item in items for field in item.ids]
    lengths = [len(bag) for bag in bags]
    offsets = torch.tensor([0, *np.cumsum(lengths)[:-1].tolist()], dtype=torch.long)
    ids = torch.from_numpy(np.concatenate(bags))
    numeric = torch.from_numpy(np.stack([item.numeric for item in items]))
    labels = torch.from_numpy(np.stack([item.labels for item in items]))
    return ids, offsets, numeric, labels


def fit(
    data: Sequence[Encoded],
    net: GuardNet | None = None,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    pos_weight: Sequence[float] | None = None,
    standardise: Sequence[Encoded] | None = None,
) -> GuardNet:
    """Train ``net`` (a new one when None) on ``data``. A new network takes its feature
    standardisation from ``standardise`` (default: the data); a network being adapted keeps
    its own."""
    if not data:
        raise ValueError("no examples to train on")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    constant = None
    if net is None:
        net = GuardNet()
        numeric = torch.from_numpy(np.stack([item.numeric for item in standardise or data]))
        spread = numeric.std(0)
        constant = spread < 1e-6
        net.mean.copy_(numeric.mean(0))
        # A floor on the spread: a feature nearly constant in training must not turn a value
        # unseen there into an input of hundreds of standard deviations.
        net.scale.copy_(spread.clamp(min=0.05))
    weights = None
    if pos_weight is not None:
        weights = torch.tensor(list(pos_weight), dtype=torch.float32)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=weights)
    # Plain Adam over everything: at 65k x 16 embedding parameters it trains a corpus of tens of
    # thousands of requests in seconds on a CPU.
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    order = list(range(len(data)))
    net.train()
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            ids, offsets, numeric, labels = _batch(
                [data[i] for i in order[start : start + batch_size]]
            )
            optimizer.zero_grad()
            loss = loss_fn(net(ids, offsets, numeric), labels)
            loss.backward()
            optimizer.step()
    if constant is not None:
        # A flag or history feature that never varied in training carried no information there,
        # yet its weights still hold their random start: in service, where it may vary, they
        # would only add noise.
        abuse = torch.cat([constant[:N_FLAGS], constant[N_REQUEST:]]).nonzero().flatten()
        content = net.injection_hidden.in_features - N_REQUEST
        with torch.no_grad():
            net.abuse_hidden.weight[:, abuse] = 0.0
            injection = constant[:N_REQUEST].nonzero().flatten()
            net.injection_hidden.weight[:, content + injection] = 0.0
    net.eval()
    return net


def fit_ensemble(datasets: Sequence[Sequence[Encoded]], seed: int = 0, **kwargs: Any) -> GuardNet:
    """A network per dataset (each its own draw of the augmentation, and seed ``seed + m``),
    folded into one (``detector.merge``: the mean of their logits, for the cost of one
    network). All take their feature standardisation from the first dataset, which ``merge``
    needs."""
    nets = [
        fit(data, seed=seed + m, standardise=datasets[0], **kwargs)
        for m, data in enumerate(datasets)
    ]
    return nets[0] if len(nets) == 1 else merge(nets)


def calibrate(scores: Sequence[float], false_positives: float) -> float:
    """The block threshold at which at most a ``false_positives`` share of ``scores`` (benign
    requests held out of training) would be blocked: just above the highest score it must
    not reach. Bounded to [0.5, 0.999], so that a tiny or odd held-out set cannot make it
    absurd."""
    ordered = sorted(scores, reverse=True)
    allowed = int(false_positives * len(ordered))
    if allowed >= len(ordered):
        return 0.5
    return min(max(ordered[allowed] + 1e-6, 0.5), 0.999)


def predict(net: GuardNet, data: Sequence[Encoded], batch_size: int = 512) -> np.ndarray:
    """Probabilities (len(data) x len(HEADS)) from the torch network (for evaluation)."""
    out = np.empty((len(data), len(HEADS)), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            ids, offsets, numeric, _ = _batch(data[start : start + batch_size])
            out[start : start + batch_size] = torch.sigmoid(net(ids, offsets, numeric)).numpy()
    return out
