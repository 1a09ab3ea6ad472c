"""Generated accelerometer streams: 3 axes at 50 Hz, in m/s^2, as a phone in a trouser pocket
records them while its wearer sits, walks, climbs stairs or runs.

Each activity is a gait model, not noise with a label: walking and running are periodic at the
wearer's step frequency (running faster, with impact peaks), with the vertical bounce at the
step frequency and the lateral sway at half of it; stairs are slower and stronger steps with a
forward lean; sitting is gravity with the thigh level, and small fidgets. Every wearer is
someone else: step frequency, vigour, how the phone sits in the pocket (a rotation of every
sample), a sensor bias per axis and its noise level; and no two steps are alike (the step
frequency drifts). Numpy only; page.html has a port of ``Gait`` for the browser.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

ACTIVITIES = ("sitting", "walking", "stairs", "running")
RATE = 50  # samples per second
G = 9.81


def _rotation(rng: np.random.Generator, degrees: float) -> np.ndarray:
    """A random rotation of up to about ``degrees`` around each axis."""
    a, b, c = np.radians(rng.uniform(-degrees, degrees, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    rotation: np.ndarray = rz @ ry @ rx
    return rotation


@dataclass(frozen=True)
class Wearer:
    cadence: float  # step frequency, relative to the typical one
    vigour: float  # acceleration amplitude, relative
    pocket: np.ndarray  # 3x3: how the phone sits (applied to every sample)
    bias: np.ndarray  # per axis, m/s^2
    noise: float  # sensor noise, m/s^2

    @staticmethod
    def random(rng: np.random.Generator) -> Wearer:
        return Wearer(
            cadence=float(np.clip(rng.normal(1.0, 0.12), 0.75, 1.3)),
            vigour=float(np.clip(rng.normal(1.0, 0.25), 0.5, 1.6)),
            pocket=_rotation(rng, 25),
            bias=rng.normal(0, 0.15, 3),
            noise=float(rng.uniform(0.05, 0.8)),
        )


def _phase(freq: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """2*pi*f*t with a step frequency that drifts a few percent (no two steps alike)."""
    drift = np.cumsum(rng.normal(0, 0.004, n))
    drift -= np.linspace(0, drift[-1], n) if n > 1 else 0  # no run-away
    wobble = np.clip(drift, -0.06, 0.06)
    return 2 * np.pi * np.cumsum(freq * (1 + wobble)) / RATE + rng.uniform(0, 2 * np.pi)


def segment(activity: str, seconds: float, who: Wearer, rng: np.random.Generator) -> np.ndarray:
    """``seconds`` of ``activity`` by ``who``: shape (seconds * RATE, 3); x forward, y left,
    z up in the wearer's frame before the pocket's rotation."""
    n = round(seconds * RATE)
    v = who.vigour
    body = np.zeros((n, 3))
    gravity = np.array([0.0, 0.0, G])
    if activity == "sitting":
        # The thigh is level: gravity along the phone's forward axis, plus fidgets.
        gravity = _rotation(rng, 12) @ np.array([G, 0.0, 0.0])
        body += np.cumsum(rng.normal(0, 0.01, (n, 3)), axis=0)
        for _ in range(rng.poisson(seconds / 4)):
            at, width = rng.integers(0, n), rng.integers(5, 25)
            body[at : at + width] += rng.normal(0, 0.8, 3)
    elif activity in ("walking", "stairs", "running"):
        freq = {"walking": 1.85, "stairs": 1.6, "running": 2.7}[activity] * who.cadence
        p = _phase(freq, n, rng)
        if activity == "walking":
            body[:, 2] = 2.6 * v * (np.sin(p) + 0.3 * np.sin(2 * p + 0.5))
            body[:, 0] = 1.3 * v * np.sin(p + np.pi / 2)
            body[:, 1] = 0.8 * v * np.sin(p / 2)
        elif activity == "stairs":
            # Each step lifts the body: a stronger, lopsided bounce; the trunk leans forward.
            body[:, 2] = 3.0 * v * (np.sin(p) + 0.45 * np.sin(2 * p + 1.2))
            body[:, 0] = 1.6 * v * np.sin(p + 0.3) + 0.3 * v * np.sin(3 * p)
            body[:, 1] = 1.1 * v * np.sin(p / 2 + 0.4)
            lean = rng.uniform(0.05, 0.3)  # radians
            gravity = _rotation(rng, 4) @ np.array([G * np.sin(lean), 0.0, G * np.cos(lean)])
        else:
            # Flight and impact: a peaked bounce (a squared half-sine), hard heel strikes.
            impact = np.maximum(0.0, np.sin(p)) ** 3
            body[:, 2] = 11.0 * v * (impact - impact.mean()) + 1.5 * v * np.sin(2 * p)
            body[:, 0] = 3.2 * v * np.sin(p + np.pi / 2)
            body[:, 1] = 1.6 * v * np.sin(p / 2)
    else:
        raise ValueError(f"unknown activity {activity!r}; one of {ACTIVITIES}")
    samples = (body + gravity) @ who.pocket.T + who.bias
    noisy: np.ndarray = (samples + rng.normal(0, who.noise, (n, 3))).astype(np.float32)
    return noisy


def stream(
    seconds: float, rng: np.random.Generator, who: Wearer | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A device's stream: activities in turn (5 to 15 s each); (samples (n, 3), activity index
    per sample (n,))."""
    who = who or Wearer.random(rng)
    parts, labels = [], []
    left = round(seconds * RATE)
    while left > 0:
        activity = int(rng.integers(len(ACTIVITIES)))
        length = min(left, int(rng.uniform(5, 15) * RATE))
        parts.append(segment(ACTIVITIES[activity], length / RATE, who, rng))
        labels.append(np.full(length, activity))
        left -= length
    return np.concatenate(parts), np.concatenate(labels)


def windows(
    count: int, size: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:  # pragma: no cover - a generator of batches
    """``count`` labelled windows of ``size`` samples, each from a wearer and activity of its
    own, in batches of up to 512: (x (b, size, 3), y (b,))."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(count):
        activity = i % len(ACTIVITIES)
        xs.append(segment(ACTIVITIES[activity], size / RATE, Wearer.random(rng), rng))
        ys.append(activity)
        if len(xs) == 512 or i == count - 1:
            yield np.stack(xs), np.array(ys)
            xs, ys = [], []
