"""Which worker trains which model (``server.workers > 1``), as the master decided it.

Each trained model has one trainer worker, the only writer of its WAL and checkpoints. That
worker trains it and publishes its weights (``versions.py``) and listens on a unix socket for
the train requests the other workers forward to it (``train_forward.py``); the others serve the
model from the published weights. The socket and the weights live in the master's private
directory under /dev/shm, which the master makes (mode 0700) and removes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Trainers:
    directory: Path  # the master's private directory
    slot: int  # this worker
    trainers: dict[str, int] = field(default_factory=dict)  # trained model -> its worker

    def trains(self, model: str) -> bool:
        """Whether this worker trains ``model`` (one nobody trains is not the question)."""
        return self.trainers.get(model, self.slot) == self.slot

    def trained(self, model: str) -> bool:
        return model in self.trainers

    def socket(self, slot: int) -> Path:
        """Where worker ``slot`` takes the train requests forwarded to it."""
        return self.directory / f"train-{slot}.sock"

    def listens(self) -> Path | None:
        """This worker's socket, if it trains anything."""
        return self.socket(self.slot) if self.slot in self.trainers.values() else None
