"""The guard's detector at serving time: a trained :class:`~webtorch.guard.detector.GuardNet`'s
weights, scored in numpy with a per-part cache, without torch.

Both heads' first layers are linear, and a field's share of them depends on the field's bytes
alone, so it is cached by those bytes: a repeated path, header block or query costs a dictionary
lookup. What remains per request is a few small vector operations. :func:`encode` (a request as
the network's training input) lives here too: it is numpy, and it fixes the numeric layout the
scorer reads.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load_file as load_numpy

from webtorch.guard.clients import N_CLIENT
from webtorch.guard.features import (
    FIELDS,
    N_FLAGS,
    N_REQUEST,
    N_STATS,
    RequestView,
    bags,
    ngram_ids,
    part_features,
    part_stats,
    parts,
    request_flags,
)

if TYPE_CHECKING:
    from webtorch.guard.detector import GuardNet

HEADS = ("injection", "abuse")
N_NUMERIC = N_REQUEST + N_CLIENT  # encode()'s layout: flags, per-field stats, client history
N_FIELDS = len(FIELDS)
CACHE_LIMIT = 50_000  # parts cached; cleared whole when full (cheap, and rare)
# A part longer than this is cached by its digest, not its bytes: the cache's memory is bounded
# by its entries (a header block may be tens of KiB, and a client chooses it).
KEY_BYTES = 256
BATCH_MISSES = 8  # cache misses in one batch from which they are computed together


def encode(view: RequestView, client: Sequence[float]) -> tuple[list[np.ndarray], np.ndarray]:
    """A request as the network's training input: each field's n-gram ids, and its numeric
    features (flags, each field's :func:`part_features`, the client's history)."""
    fields = []
    grams = []
    for raw in parts(view):
        stats, text = part_features(raw)
        fields.append(stats)
        grams.append(ngram_ids(text).astype(np.int64) if raw else np.zeros(0, np.int64))
    numeric = np.concatenate(
        [np.asarray(request_flags(view), np.float32), *fields, np.asarray(client, np.float32)]
    )
    return grams, numeric


class Scorer:
    """Scores requests with a trained :class:`GuardNet`'s weights, in numpy."""

    def __init__(self, weights: dict[str, Any]) -> None:
        self.load(weights)

    @classmethod
    def from_file(cls, path: Path) -> Scorer:
        return cls(load_numpy(str(path)))

    @classmethod
    def from_net(cls, net: GuardNet) -> Scorer:
        return cls({k: v.detach().cpu().numpy() for k, v in net.state_dict().items()})

    def load(self, weights: dict[str, Any]) -> None:
        """Swap in new weights (after online adaptation); the part cache starts over."""

        def w(name: str) -> np.ndarray:
            return np.ascontiguousarray(weights[name], dtype=np.float32)

        self.embedding = w("embed.weight")
        dim = self.embedding.shape[1]
        mean, scale = w("mean"), w("scale")
        content = N_FIELDS * 2 * dim
        # Both heads' first layers are linear in their inputs: fold the standardisation in,
        # (x - mean) / scale @ W == x @ (W / scale) - (mean / scale) @ W, and split the weights
        # by input so that each field's share can be computed once and cached.
        i1 = w("injection_hidden.weight").T  # rows: fields' content, flags, fields' stats
        request = slice(0, N_REQUEST)
        numeric = i1[content:] / scale[request, None]
        i_b1 = w("injection_hidden.bias") - (mean[request] / scale[request]) @ i1[content:]
        a1 = w("abuse_hidden.weight").T  # rows: flags, client, path content, path stats
        flags, client = slice(0, N_FLAGS), slice(N_FLAGS, N_FLAGS + N_CLIENT)
        path_stats = slice(N_FLAGS, N_FLAGS + N_STATS)  # in encode()'s layout
        history = slice(N_REQUEST, N_NUMERIC)
        a_content = a1[N_FLAGS + N_CLIENT : N_FLAGS + N_CLIENT + 2 * dim]
        a_stats = a1[N_FLAGS + N_CLIENT + 2 * dim :] / scale[path_stats, None]
        a_b1 = (
            w("abuse_hidden.bias")
            - (mean[:N_FLAGS] / scale[:N_FLAGS]) @ a1[flags]
            - (mean[history] / scale[history]) @ a1[client]
            - (mean[path_stats] / scale[path_stats]) @ a1[N_FLAGS + N_CLIENT + 2 * dim :]
        )
        # Both heads as one: hidden units [injection | abuse]. A request's flags, its client's
        # history and a constant 1 (the biases) go through one matrix, each field adds its
        # cached share, and one more matrix gives both logits: a handful of numpy calls.
        hi, ha = i_b1.shape[0], a_b1.shape[0]
        w_in = np.zeros((N_FLAGS + N_CLIENT + 1, hi + ha), dtype=np.float32)
        w_in[:N_FLAGS, :hi] = numeric[:N_FLAGS]
        w_in[:N_FLAGS, hi:] = a1[flags] / scale[:N_FLAGS, None]
        w_in[N_FLAGS : N_FLAGS + N_CLIENT, hi:] = a1[client] / scale[history, None]
        w_in[-1, :hi], w_in[-1, hi:] = i_b1, a_b1
        self._w_in = w_in
        w_out = np.zeros((hi + ha, 2), dtype=np.float32)
        w_out[:hi, 0], w_out[hi:, 1] = w("injection_out.weight")[0], w("abuse_out.weight")[0]
        self._w_out = w_out
        self._b_out = np.asarray(
            [w("injection_out.bias")[0], w("abuse_out.bias")[0]], dtype=np.float32
        )
        # Each field's share from one vector, [mean of its bag's rows, their max, its stats],
        # through one matrix: its injection columns, and the abuse head's for the path.
        self._w_part = []
        for f in range(N_FIELDS):
            part = np.zeros((2 * dim + N_STATS, hi + ha), dtype=np.float32)
            part[: 2 * dim, :hi] = i1[2 * dim * f : 2 * dim * (f + 1)]
            part[2 * dim :, :hi] = numeric[N_FLAGS + f * N_STATS : N_FLAGS + (f + 1) * N_STATS]
            if f == 0:
                part[: 2 * dim, hi:] = a_content
                part[2 * dim :, hi:] = a_stats
            self._w_part.append(part)
        self._cache: dict[tuple[int, bytes], np.ndarray] = {}
        self._no_part = np.zeros(hi + ha, dtype=np.float32)

    def _part(self, field: int, raw: bytes) -> np.ndarray:
        """A field's share of both heads' hidden units (the abuse head's from the path only).
        It depends on the field's bytes alone, so it is cached by them. A miss (a fresh session
        id in a query, say) is on the request's path: a handful of numpy calls."""
        key = _key(field, raw)
        cached = self._cache.get(key)
        if cached is None:
            stats, text = part_features(raw)
            rows = self.embedding[ngram_ids(text)]
            pooled = (np.add.reduce(rows) * (1.0 / len(rows)), np.maximum.reduce(rows), stats)
            cached = np.concatenate(pooled) @ self._w_part[field]
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = cached
        return cached

    def score_one(self, view: RequestView, client: list[float]) -> tuple[float, float]:
        """(injection, abuse) probabilities of one request: the request path's call, written
        for the fewest numpy calls (each costs about a microsecond at these sizes)."""
        part = self._part
        pre = np.asarray([*request_flags(view), *client, 1.0], np.float32) @ self._w_in
        for field, raw in enumerate(parts(view)):
            if raw:
                pre += part(field, raw)
        np.maximum(pre, 0.0, out=pre)
        injection, abuse = (pre @ self._w_out + self._b_out).tolist()
        return _sigmoid(injection), _sigmoid(abuse)

    def score(self, views: Sequence[RequestView], clients: Sequence[Sequence[float]]) -> np.ndarray:
        """Probabilities (batch x :data:`HEADS`), the batch scored at once: the numpy calls
        :meth:`score_one` makes per request are made once for the batch, and so are those for
        the parts missing from the cache (:meth:`_parts`). What is left per request is building
        its row and looking its parts up (the server scores the requests that arrive together
        this way)."""
        cache = self._cache
        rows: list[list[float]] = []
        shares: list[np.ndarray | None] = []
        starts: list[int] = []
        misses: list[tuple[int, int, bytes]] = []  # (index in shares, field, raw)
        for view, client in zip(views, clients, strict=True):
            rows.append([*request_flags(view), *client, 1.0])
            starts.append(len(shares))
            for field, raw in enumerate(parts(view)):
                if raw:
                    share = cache.get(_key(field, raw))
                    if share is None:
                        misses.append((len(shares), field, raw))
                    shares.append(share)
            if len(shares) == starts[-1]:  # no part at all: a zero share keeps the rows aligned
                shares.append(self._no_part)
        if misses:
            computed = self._parts([(field, raw) for _, field, raw in misses])
            for (index, _, _), share in zip(misses, computed, strict=True):
                shares[index] = share
        pre = np.asarray(rows, np.float32) @ self._w_in
        pre += np.add.reduceat(np.stack(shares), starts, axis=0)  # type: ignore[arg-type]
        np.maximum(pre, 0.0, out=pre)
        logits = pre @ self._w_out + self._b_out
        np.clip(logits, -60.0, 60.0, out=logits)
        probabilities: np.ndarray = 1.0 / (1.0 + np.exp(-logits))
        return probabilities

    def _parts(self, items: Sequence[tuple[int, bytes]]) -> list[np.ndarray]:
        """:meth:`_part` of several (field, raw) parts not in the cache, computed together (and
        cached): their bags by :func:`bags`, pooled by ``reduceat``, then one product per field
        present. The joint pass costs some thirty numpy calls whatever its size, so below
        ``BATCH_MISSES`` parts it is dearer than one :meth:`_part` each (measured: one part
        93 us together against 24 alone; even from about 6)."""
        if len(items) < BATCH_MISSES:
            return [self._part(field, raw) for field, raw in items]
        stats = []
        texts = []
        for _, raw in items:
            numbers, text = part_stats(raw)
            stats.append(numbers)
            texts.append(text)
        ids, counts = bags(texts)
        rows = self.embedding[ids]
        offsets = np.cumsum(counts) - counts
        pooled = np.concatenate(
            (
                np.add.reduceat(rows, offsets, axis=0) / counts[:, None],
                np.maximum.reduceat(rows, offsets, axis=0),
                np.asarray(stats, np.float32),
            ),
            axis=1,
        )
        n = len(items)
        fields = np.fromiter((field for field, _ in items), np.int64, n)
        shares = np.empty((n, self._w_in.shape[1]), dtype=np.float32)
        for field in np.unique(fields).tolist():
            rows_of = fields == field
            shares[rows_of] = pooled[rows_of] @ self._w_part[field]
        out = list(shares)
        cache = self._cache
        if len(cache) + n > CACHE_LIMIT:
            cache.clear()
        for (field, raw), share in zip(items, out, strict=True):
            cache[_key(field, raw)] = share
        return out


def _key(field: int, raw: bytes) -> tuple[int, bytes]:
    """A part's cache key: its bytes, or past KEY_BYTES their digest (under another field
    number, so that no short part's bytes can equal a long one's digest)."""
    if len(raw) <= KEY_BYTES:
        return field, raw
    return field + N_FIELDS, hashlib.blake2b(raw, digest_size=16).digest()


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -60.0 else 0.0
