"""The guard's model: trained with PyTorch, scored in numpy with a per-part cache.

Two heads, because they call for different actions:

- **injection** (the request's content is an attack: SQLi, XSS, command injection, traversal,
  template injection, ...): an MLP over each field's content (path, query, header block, body
  prefix), read as the mean and the element-wise max of its hashed byte 3-grams' learned
  embeddings (a byte-level model with no convolution to pay per request), plus the request's
  numbers: its shape and each field's byte-class shares. Not the client's history: injection
  is a property of the content, and history would let it learn when attacks happened to
  arrive in its training data. Fields are kept
  apart so that a long header block cannot dilute a short query, and the max pooling means a
  payload in a 2 KB cookie is not averaged away.
- **abuse** (the client behaves like a flood or a scan): a smaller MLP over the client's recent
  history (``clients.py``), the request's shape and its path's content and shares (a scanner's
  wordlist paths look like nothing a user clicks).

Serving does not call torch: it scores with :class:`~webtorch.guard.scorer.Scorer`, in numpy
(see there), so a server whose guard does not adapt online never loads torch. Weights travel as
safetensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from webtorch.guard.clients import N_CLIENT
from webtorch.guard.features import BUCKETS, N_FLAGS, N_REQUEST, N_STATS
from webtorch.guard.scorer import HEADS, N_FIELDS, N_NUMERIC, Scorer, encode

__all__ = ["HEADS", "GuardNet", "Scorer", "encode", "load_net", "merge", "save"]


class GuardNet(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.embed = nn.Embedding(BUCKETS, dim)
        # Near zero: an n-gram training never saw must read as nothing, not as the random
        # vector it started with (the max pooling would pick that noise up).
        nn.init.normal_(self.embed.weight, std=0.001)
        # Injection is a property of the content: this head does not see the client's history
        # (which would let it learn when, in its training data, attacks happened to arrive).
        self.injection_hidden = nn.Linear(N_FIELDS * 2 * dim + N_REQUEST, hidden)
        self.injection_out = nn.Linear(hidden, 1)
        abuse_in = N_FLAGS + N_CLIENT + 2 * dim + N_STATS
        self.abuse_hidden = nn.Linear(abuse_in, hidden // 2)
        self.abuse_out = nn.Linear(hidden // 2, 1)
        # Standardisation of the numeric features, in encode()'s layout (from the training set).
        self.mean: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("mean", torch.zeros(N_NUMERIC))
        self.register_buffer("scale", torch.ones(N_NUMERIC))

    def forward(
        self, ids: torch.Tensor, offsets: torch.Tensor, numeric: torch.Tensor
    ) -> torch.Tensor:
        """Logits (batch x :data:`HEADS`). ``offsets``: where each (request, field) bag starts in
        ``ids``, request-major; an empty field is an empty bag (zeros)."""
        batch = numeric.shape[0]
        weight = self.embed.weight
        mean = F.embedding_bag(ids, weight, offsets, mode="mean")
        top = F.embedding_bag(ids, weight, offsets, mode="max")
        content = torch.cat([mean, top], dim=1).reshape(batch, N_FIELDS, 2 * self.dim)
        x = (numeric - self.mean) / self.scale
        injection = self.injection_out(
            torch.relu(
                self.injection_hidden(torch.cat([content.flatten(1), x[:, :N_REQUEST]], dim=1))
            )
        )
        flags, client, path_stats = x[:, :N_FLAGS], x[:, N_REQUEST:], x[:, N_FLAGS:][:, :N_STATS]
        abuse = self.abuse_out(
            torch.relu(self.abuse_hidden(torch.cat([flags, client, content[:, 0], path_stats], 1)))
        )
        return torch.cat([injection, abuse], dim=1)


def merge(nets: Sequence[GuardNet]) -> GuardNet:
    """One network whose logits are the mean of ``nets``' logits: an ensemble, folded.

    Members trained from different seeds disagree most where the data says least, and their
    mean is steadier there: it is what took the detector's false positives on unfamiliar benign
    text (a bio that mentions "select" and "union") below the attacks it finds. Folded, it
    costs the scorer what one network does, call for call: the embeddings side by side (one
    wider row per n-gram, pooled at once), each member's hidden units reading only its own
    slice of them (block-diagonal first layers), the output layers averaged. The members must
    share their feature standardisation (``fit`` on the same data gives them the same)."""
    first = nets[0]
    k, d, h = len(nets), first.dim, first.hidden
    if any(n.dim != d or n.hidden != h for n in nets):
        raise ValueError("ensemble members must have the same shape")
    if any(
        not torch.equal(n.mean, first.mean) or not torch.equal(n.scale, first.scale) for n in nets
    ):
        raise ValueError("ensemble members must share their feature standardisation")
    out = GuardNet(dim=k * d, hidden=k * h)
    big_d, ha = k * d, h // 2
    with torch.no_grad():
        out.mean.copy_(first.mean)
        out.scale.copy_(first.scale)
        out.embed.weight.copy_(torch.cat([n.embed.weight for n in nets], dim=1))
        for layer in (out.injection_hidden, out.abuse_hidden):
            layer.weight.zero_()
        for m, net in enumerate(nets):
            cols = slice(m * d, (m + 1) * d)  # this member's slice of a pooled row
            rows = slice(m * h, (m + 1) * h)
            src = net.injection_hidden.weight
            for f in range(N_FIELDS):
                base, big = f * 2 * d, f * 2 * big_d
                out.injection_hidden.weight[rows, big + cols.start : big + cols.stop] = src[
                    :, base : base + d
                ]
                out.injection_hidden.weight[
                    rows, big + big_d + cols.start : big + big_d + cols.stop
                ] = src[:, base + d : base + 2 * d]
            content, big_content = N_FIELDS * 2 * d, N_FIELDS * 2 * big_d
            out.injection_hidden.weight[rows, big_content:] = src[:, content:]
            out.injection_hidden.bias[rows] = net.injection_hidden.bias
            out.injection_out.weight[:, rows] = net.injection_out.weight / k
            # The abuse head: [flags, client history, path mean, path max, path stats].
            rows = slice(m * ha, (m + 1) * ha)
            src = net.abuse_hidden.weight
            lead = N_FLAGS + N_CLIENT
            out.abuse_hidden.weight[rows, :lead] = src[:, :lead]
            out.abuse_hidden.weight[rows, lead + cols.start : lead + cols.stop] = src[
                :, lead : lead + d
            ]
            out.abuse_hidden.weight[rows, lead + big_d + cols.start : lead + big_d + cols.stop] = (
                src[:, lead + d : lead + 2 * d]
            )
            out.abuse_hidden.weight[rows, lead + 2 * big_d :] = src[:, lead + 2 * d :]
            out.abuse_hidden.bias[rows] = net.abuse_hidden.bias
            out.abuse_out.weight[:, rows] = net.abuse_out.weight / k
        out.injection_out.bias.copy_(torch.stack([n.injection_out.bias for n in nets]).mean(0))
        out.abuse_out.bias.copy_(torch.stack([n.abuse_out.bias for n in nets]).mean(0))
    out.eval()
    return out


def save(net: GuardNet, path: Path, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    # The embedding is nearly all of the file: half precision halves it (2 MB), and float16's
    # 3 significant digits are far finer than the detector's thresholds need.
    tensors["embed.weight"] = tensors["embed.weight"].half()
    meta = {"dim": str(net.dim), "hidden": str(net.hidden), **(metadata or {})}
    save_file(tensors, str(path), metadata=meta)


def load_net(path: Path) -> GuardNet:
    """A saved network, for further training (online adaptation) in torch."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta: dict[str, str] = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    net = GuardNet(int(meta.get("dim", 16)), int(meta.get("hidden", 64)))
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net
