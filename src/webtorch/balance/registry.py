"""Policy names, as written in ``[upstreams.NAME] policy = ...``, and their factories.

A factory takes the group and every option any policy understands, and uses those it needs, so
config and the proxy build any policy the same way. A new policy adds one entry to ``POLICIES``
(and a field to :class:`PolicyOptions` if it has a setting of its own).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from webtorch.balance.base import Policy, Upstream
from webtorch.balance.classic import LeastConn, Random2, RoundRobin
from webtorch.balance.hashing import BoundedLoadHash
from webtorch.balance.peak_ewma import PeakEwma
from webtorch.balance.prequal import Prequal


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    hash_key: str | None = None  # a KeySpec string; required by "hash"
    balance: float = 0.25  # the bounded-load epsilon of "hash"
    rng: random.Random | None = None  # None: a fresh unseeded Random per policy
    # The policy's own config section as a dict ([upstreams.X.peak_ewma], .prequal, .learned;
    # empty: its defaults), and the group's name (a learned policy's state is per group).
    settings: Mapping[str, Any] = field(default_factory=dict)
    group_name: str = ""


PolicyFactory = Callable[[Sequence[Upstream], PolicyOptions], Policy]


def _hash(group: Sequence[Upstream], options: PolicyOptions) -> Policy:
    if options.hash_key is None:
        raise ValueError('policy "hash" needs hash_key (e.g. "header:x-model")')
    return BoundedLoadHash(group, options.hash_key, balance=options.balance)


def _learned(group: Sequence[Upstream], options: PolicyOptions) -> Policy:
    from webtorch.balance.learned import Learned  # imports torch: only when used

    state_dir = options.settings.get("state_dir")
    return Learned(
        group,
        settings=options.settings,
        hash_key=options.hash_key,
        rng=options.rng,
        state_dir=Path(state_dir) if state_dir is not None else None,
    )


POLICIES: dict[str, PolicyFactory] = {
    "round_robin": lambda group, options: RoundRobin(group),
    "least_conn": lambda group, options: LeastConn(group),
    "random2": lambda group, options: Random2(group, rng=options.rng),
    "hash": _hash,
    "peak_ewma": lambda group, options: PeakEwma.from_settings(
        group, options.settings, options.rng
    ),
    "prequal": lambda group, options: Prequal.from_settings(group, options.settings, options.rng),
    "learned": _learned,
}


def make_policy(
    name: str,
    group: Sequence[Upstream],
    *,
    hash_key: str | None = None,
    balance: float = 0.25,
    rng: random.Random | None = None,
    settings: Mapping[str, Any] | None = None,
    group_name: str = "",
) -> Policy:
    """A new policy instance for one upstream group; ValueError for an unknown name or a bad or
    missing option (the message names it, for config validation)."""
    factory = POLICIES.get(name)
    if factory is None:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown balancing policy {name!r}; expected one of: {known}")
    options = PolicyOptions(hash_key, balance, rng, settings or {}, group_name)
    return factory(group, options)
