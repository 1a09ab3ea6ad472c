"""A guard built from ``[guard]``: its detector's weights (adapted, configured or shipped) and
where its online adaptation keeps state."""

from __future__ import annotations

from pathlib import Path

from webtorch.config import GuardConfig
from webtorch.guard.core import Guard
from webtorch.guard.scorer import Scorer
from webtorch.shared.store import StateStore

DEFAULT_MODEL = Path(__file__).parent / "guard.safetensors"
ADAPTED = "guard.safetensors"  # the adapted weights' name in the guard's state directory


def state_dir(config: GuardConfig, base_dir: Path) -> Path:
    if config.state_dir is None:
        return Path.cwd() / "webtorch-state" / "guard"
    return base_dir / config.state_dir


def weights_of(config: GuardConfig, base_dir: Path) -> Path | None:
    """The detector's weights: adapted ones from an earlier run's feedback if there are any,
    else the configured model, else the shipped one; None for model = "none"."""
    if config.model == "none":
        return None
    adapted = state_dir(config, base_dir) / ADAPTED
    if config.feedback and adapted.is_file():
        return adapted
    return DEFAULT_MODEL if config.model is None else base_dir / config.model


def make_guard(config: GuardConfig, base_dir: Path, store: StateStore | None = None) -> Guard:
    """``store``: where the buckets, bans and surge live (shared/: one worker's own by default,
    the whole server's with several workers)."""
    weights = weights_of(config, base_dir)
    scorer = None if weights is None else Scorer.from_file(weights)
    return Guard(config, scorer, store=store)
