"""A trained model's weights, shared between worker processes as numbered versions.

With ``server.workers > 1`` one worker trains a model (its trainer: ``trainers.py``); every
other worker serves the same model from its own copy of the network. The trainer worker
publishes its weights after each optimizer step, before that step's answers are sent, into a
file in the master's private directory under /dev/shm (memory, not disk), mapped by every
worker; the others copy them into their network when their executor is between two batches, so
no answer mixes two versions.

The file: a header, then every tensor of the network's ``state_dict`` (parameters and buffers),
back to back in state_dict order, as raw bytes. Every worker loads the same model file, so
every worker computes the same layout; its fingerprint in the header catches one that does not.

One writer, any number of readers, no lock: a sequence counter (a seqlock). The writer makes it
odd, writes, then makes it even; a reader copies only from an even counter, into a staging
copy, and keeps it only if the counter did not move meanwhile; after a few tries it keeps the
version it had and tries again at its next batch. A writer that dies mid-write leaves the
counter odd: readers keep their version, and the restarted trainer's first publication makes it
even again. (The counter and the data are plain stores and loads, ordered on x86-64 (TSO); a
weakly ordered CPU would need fences.)

A version is the trainer's optimizer step count (``Trainer.step``), so a prediction's version
says which train answers it includes.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import struct
import time
from pathlib import Path
from typing import Final

import torch

log: Final = logging.getLogger("webtorch.serve")

# seq (u64), version (i64), published (f64, time.monotonic(): one clock for all processes of a
# machine), fingerprint (16 bytes of the layout's hash).
_HEADER: Final = struct.Struct("<Qqd16s")
_DATA: Final = 64  # the tensors start here (aligned for any dtype)
# A reader that finds the counter moving retries this often before it keeps what it has.
_TRIES: Final = 3

NO_VERSION: Final = -1


def weights_path(directory: Path, model: str) -> Path:
    return directory / f"weights-{model}"


class _Layout:
    """Where each tensor of a network's state_dict lives in the file."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.tensors: list[tuple[torch.Tensor, int, int]] = []  # (tensor, offset, bytes)
        described: list[str] = []
        offset = _DATA
        for name, tensor in network.state_dict(keep_vars=False).items():
            size = tensor.numel() * tensor.element_size()
            self.tensors.append((tensor, offset, size))
            described.append(f"{name}:{tensor.dtype}:{list(tensor.shape)}")
            offset += (size + 63) // 64 * 64
        self.size = offset
        self.fingerprint = hashlib.blake2b("\n".join(described).encode(), digest_size=16).digest()

    def views(self, memory: mmap.mmap) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(the network's tensor, its bytes in ``memory`` as a tensor of the same dtype and
        shape) for each tensor."""
        pairs = []
        for tensor, offset, size in self.tensors:
            if size == 0:
                continue
            raw = torch.frombuffer(memory, dtype=torch.uint8, count=size, offset=offset)
            pairs.append((tensor, raw.view(tensor.dtype).view(tensor.shape)))
        return pairs


def _open(path: Path, size: int, *, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create and os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        if create:
            # The pages now, or an error now: a write to a mapping that a full /dev/shm cannot
            # back is a SIGBUS, not an exception.
            os.posix_fallocate(fd, 0, size)
        elif os.fstat(fd).st_size != size:
            raise ValueError(f"{path} holds {os.fstat(fd).st_size} bytes, the model {size}")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class Publisher:
    """The trainer worker's side: its network's weights out, as version ``step``."""

    def __init__(self, path: Path, network: torch.nn.Module) -> None:
        self.layout = layout = _Layout(network)
        self.memory = memory = _open(path, layout.size, create=True)
        self._pairs = layout.views(memory)
        self.version = NO_VERSION

    def publish(self, version: int) -> None:
        memory = self.memory
        seq = _HEADER.unpack_from(memory, 0)[0]
        if seq % 2 == 0:  # odd already: a trainer died writing; this write ends that one
            seq += 1
            _HEADER.pack_into(memory, 0, seq, NO_VERSION, 0.0, self.layout.fingerprint)
        with torch.no_grad():
            for tensor, shared in self._pairs:
                shared.copy_(tensor)
        _HEADER.pack_into(memory, 0, seq + 1, version, time.monotonic(), self.layout.fingerprint)
        self.version = version

    def close(self) -> None:
        self._pairs = []
        self.memory.close()


class Subscriber:
    """Another worker's side: the newest version into its own network, between batches."""

    def __init__(self, path: Path, network: torch.nn.Module) -> None:
        self.path = path
        self.layout = _Layout(network)
        self.memory: mmap.mmap | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        # A version is copied here first and into the network only once known whole: a copy
        # that a write overlapped never reaches a batch.
        self._staging: list[torch.Tensor] = []
        self._refused = False
        self.seen = 0  # the counter of the version held (0: none yet)
        self.version = NO_VERSION
        self.lag_steps = 0  # the versions skipped by the last switch
        self.lag_seconds = 0.0  # from the publication of the version switched to, to the switch

    def refresh(self) -> bool:
        """Switch to the newest complete version if there is one newer; whether a version is
        held (False: the trainer has published none yet)."""
        memory = self.memory
        if memory is None:
            memory = self._map()
            if memory is None:
                return False
        layout = self.layout
        for _ in range(_TRIES):
            seq, version, published, fingerprint = _HEADER.unpack_from(memory, 0)
            if seq == self.seen:
                break  # nothing new
            if seq % 2:
                continue  # a write in progress (microseconds for a small model): look again
            if fingerprint != layout.fingerprint:
                if not self._refused:
                    log.error("%s: its layout is not this model's: not switching", self.path)
                    self._refused = True
                break
            staging = self._staging
            for held, (_, shared) in zip(staging, self._pairs, strict=True):
                held.copy_(shared)
            if _HEADER.unpack_from(memory, 0)[0] != seq:
                continue  # overwritten while copied: the copy may be torn, copy again
            with torch.no_grad():
                for held, (tensor, _) in zip(staging, self._pairs, strict=True):
                    tensor.copy_(held)
            self.seen = seq
            if self.version != NO_VERSION:
                self.lag_steps = version - self.version
            self.lag_seconds = time.monotonic() - published
            self.version = version
            break
        return self.version != NO_VERSION

    def _map(self) -> mmap.mmap | None:
        try:
            self.memory = memory = _open(self.path, self.layout.size, create=False)
        except FileNotFoundError:
            return None
        except ValueError as exc:  # another model's weights: serve none rather than those
            if not self._refused:
                log.error("%s; not serving its versions", exc)
                self._refused = True
            return None
        self._pairs = self.layout.views(memory)
        self._staging = [torch.empty_like(shared) for _, shared in self._pairs]
        return memory

    def close(self) -> None:
        self._pairs = []
        if self.memory is not None:
            self.memory.close()
