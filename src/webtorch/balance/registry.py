"""Policy names, as written in ``[upstreams.NAME] policy = ...``, and their factories.

A factory takes the group and every option any policy understands, and uses those it needs, so
config and the proxy build any policy the same way. A policy with settings of its own takes
them typed (``balance/settings.py``, which the config's sections are), never as a dict. A new
policy adds one entry to ``POLICIES`` (and, with settings, a class to ``settings.SETTINGS`` and
a section to ``UpstreamConfig``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from webtorch.balance.base import Policy, Upstream
from webtorch.balance.classic import LeastConn, Random2, RoundRobin
from webtorch.balance.hashing import DEFAULT_BALANCE, BoundedLoadHash
from webtorch.balance.peak_ewma import PeakEwma
from webtorch.balance.prequal import Prequal
from webtorch.balance.settings import (
    SETTINGS,
    LearnedSettings,
    PeakEwmaSettings,
    PolicySettings,
    PrequalSettings,
)


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    hash_key: str | None = None  # a KeySpec string; required by "hash"
    balance: float = DEFAULT_BALANCE  # the bounded-load epsilon of "hash"
    rng: random.Random | None = None  # None: a fresh unseeded Random per policy
    # The policy's own settings ([upstreams.X.peak_ewma], .prequal, .learned; None: its
    # defaults), and the group's name.
    settings: PolicySettings | None = None
    group_name: str = ""
    # A learning policy trains off the caller's thread (the server's event loop); False for a
    # simulation on a fake clock, whose steps must land at the same moments every run.
    train_in_thread: bool = True


PolicyFactory = Callable[[Sequence[Upstream], PolicyOptions], Policy]
_S = TypeVar("_S", PeakEwmaSettings, PrequalSettings, LearnedSettings)


def _own(name: str, kind: type[_S], options: PolicyOptions) -> _S:
    """The settings of policy ``name``: of its own class, or its defaults."""
    settings = options.settings
    if settings is None:
        return kind()
    if type(settings) is not kind:
        raise TypeError(f"policy {name!r} takes {kind.__name__}, not {type(settings).__name__}")
    return settings


def _hash(group: Sequence[Upstream], options: PolicyOptions) -> Policy:
    if options.hash_key is None:
        raise ValueError('policy "hash" needs hash_key (e.g. "header:x-model")')
    return BoundedLoadHash(group, options.hash_key, balance=options.balance)


def _learned(group: Sequence[Upstream], options: PolicyOptions) -> Policy:
    from webtorch.balance.learned import Learned  # imports torch: only when used

    return Learned(
        group,
        _own("learned", LearnedSettings, options),
        hash_key=options.hash_key,
        rng=options.rng,
        train_in_thread=options.train_in_thread,
    )


POLICIES: dict[str, PolicyFactory] = {
    "round_robin": lambda group, options: RoundRobin(group),
    "least_conn": lambda group, options: LeastConn(group),
    "random2": lambda group, options: Random2(group, rng=options.rng),
    "hash": _hash,
    "peak_ewma": lambda group, options: PeakEwma(
        group, _own("peak_ewma", PeakEwmaSettings, options), rng=options.rng
    ),
    "prequal": lambda group, options: Prequal(
        group, _own("prequal", PrequalSettings, options), rng=options.rng
    ),
    "learned": _learned,
}
assert set(SETTINGS) <= set(POLICIES)


def make_policy(
    name: str,
    group: Sequence[Upstream],
    *,
    hash_key: str | None = None,
    balance: float = DEFAULT_BALANCE,
    rng: random.Random | None = None,
    settings: PolicySettings | None = None,
    group_name: str = "",
    train_in_thread: bool = True,
) -> Policy:
    """A new policy instance for one upstream group; ValueError for an unknown name or a bad or
    missing option (the message names it, for config validation), TypeError for settings of
    another policy's class."""
    factory = POLICIES.get(name)
    if factory is None:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown balancing policy {name!r}; expected one of: {known}")
    options = PolicyOptions(hash_key, balance, rng, settings, group_name, train_in_thread)
    return factory(group, options)
