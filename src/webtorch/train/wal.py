"""The write-ahead log of training micro-batches.

Every optimizer step is logged before it is acknowledged, so after a crash the trainer restores the
newest checkpoint and replays the log to reach exactly the state it had acknowledged.

Record format (little-endian)::

    b"WTW1" | u32 payload length | u32 crc32(seq + payload) | u64 seq | payload

The payload is the batch's tensors as a safetensors blob (never pickle: the log is data, not code).
``seq`` is the optimizer step the batch produces; records are contiguous in ``seq``. The crc covers
the seq too, so a flipped bit there cannot pass as a gap or a duplicate.

:func:`encode_record` and :func:`decode_records` are the sans-IO core. :class:`WriteAheadLog` is the
file shell: a directory of segments ``wal-{first_seq:016d}.log`` (0600: they hold the clients'
training data). Appends wait in memory and :meth:`WriteAheadLog.sync` writes and makes everything
appended so far durable with one write and one fsync (group commit: one sync per request, however
many micro-batches it holds); a failed sync rolls back what it did not make durable, since those
records are answered with an error and must never be replayed. A crash can therefore leave a
half-written record at the end of the last segment; :meth:`WriteAheadLog.recover` cuts such a torn
tail, since nothing in it was ever acknowledged. A torn tail is a bad record in the last segment
with no intact record after it (:func:`valid_frame_after`). A bad record anywhere else, or one
followed by an intact record, was synced once and is real corruption, which is never silently
dropped: recovery raises :class:`WalCorrupt` naming the segment and offset and changes nothing.
Whole segments are deleted once no kept checkpoint needs them, which is why
:meth:`WriteAheadLog.rotate` exists.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from webtorch.files import PRIVATE_FILE, fsync_directory, make_private_dir, truncate_durably

logger: Final = logging.getLogger(__name__)

MAGIC: Final = b"WTW1"
_HEADER: Final = struct.Struct("<4sIIQ")
_SEQ: Final = struct.Struct("<Q")
_SEGMENT_NAME: Final = re.compile(r"wal-(\d{16})\.log")


class WalCorrupt(Exception):
    """The log is damaged somewhere other than a torn tail; replaying past it would lose steps."""


@dataclass(frozen=True, eq=False)
class WalRecord:
    seq: int
    tensors: dict[str, np.ndarray]
    offset: int
    """Where the record starts in the scanned data, for error messages."""


@dataclass(frozen=True)
class ScanResult:
    records: list[WalRecord]
    valid_bytes: int
    """Offset just after the last good record."""
    error: str | None
    """Why scanning stopped before the end of the data, or None if it did not."""


def encode_record(seq: int, tensors: Mapping[str, np.ndarray]) -> bytes:
    # safetensors.numpy.save reads the raw buffer and silently scrambles non-contiguous arrays
    # (np.ascontiguousarray would turn 0-d arrays into 1-d ones).
    payload = safetensors.numpy.save(
        {k: np.require(v, requirements="C") for k, v in tensors.items()}
    )
    if len(payload) > 0xFFFF_FFFF:
        raise ValueError(f"micro-batch {seq} is {len(payload)} bytes, over the 4 GiB record limit")
    seq_bytes = _SEQ.pack(seq)
    crc = zlib.crc32(payload, zlib.crc32(seq_bytes))
    return _HEADER.pack(MAGIC, len(payload), crc, seq) + payload


def decode_records(data: bytes | memoryview) -> ScanResult:
    view = memoryview(data)
    records: list[WalRecord] = []
    offset = 0
    error: str | None = None
    while offset < len(view):
        if len(view) - offset < _HEADER.size:
            error = "truncated header"
            break
        magic, length, crc, seq = _HEADER.unpack_from(view, offset)
        if magic != MAGIC:
            error = "bad magic"
            break
        start = offset + _HEADER.size
        if len(view) - start < length:
            error = "truncated payload"
            break
        payload = view[start : start + length]
        if zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
            error = "crc mismatch"
            break
        try:
            tensors = safetensors.numpy.load(bytes(payload))
        except SafetensorError as exc:
            error = f"undecodable payload: {exc}"
            break
        records.append(WalRecord(seq, tensors, offset))
        offset = start + length
    return ScanResult(records, offset, error)


def valid_frame_after(data: bytes, offset: int) -> int | None:
    """The offset of the first intact record (magic, a length that fits, matching crc) that
    starts after ``offset``, or None.

    Tells a torn tail from damage in the middle: a crash mid-write leaves at most the records of
    the last write, half-written, with nothing intact after the tear; an intact record after a
    bad one means acknowledged records follow the damage. Only checks frames, not payloads: a
    crc match on garbage is a 1-in-2**32 chance. (A training example could embed a crafted frame
    in its own payload; if that record is then torn, start is refused: safe, never lossy.)
    """
    view = memoryview(data)
    position = offset + 1
    while (start := data.find(MAGIC, position)) >= 0:
        position = start + 1
        if len(view) - start < _HEADER.size:
            return None
        _, length, crc, seq = _HEADER.unpack_from(view, start)
        body = start + _HEADER.size
        if len(view) - body < length:
            continue
        if zlib.crc32(view[body : body + length], zlib.crc32(_SEQ.pack(seq))) == crc:
            return start
    return None


def delete_segments(paths: list[Path]) -> None:
    """Unlink segments :meth:`WriteAheadLog.detach_through` let go, durably."""
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        fsync_directory(paths[0].parent)


_SEGMENT_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may be short, e.g. at ENOSPC).

    Counts bytes rather than testing a shrinking memoryview for truth: compiled by mypyc, that
    loop wrote every record twice."""
    written = os.write(fd, data)
    total = len(data)
    while written < total:
        written += os.write(fd, data[written:])  # rare: a copy is fine


class WriteAheadLog:
    """Segment files in one directory; call :meth:`recover` once before appending.

    Appended records wait in memory until :meth:`sync` writes them with one system call and
    fsyncs: nothing unacknowledged sits in a file object's buffer that a later flush or close
    could write. If writing or syncing fails, everything since the last successful sync is
    rolled back (the segment cut back to its durable size, segments begun since deleted), so a
    record answered with an error is never replayed, and the log refuses further use.

    Not thread-safe, but holds no thread affinity: one thread at a time may use it.
    """

    def __init__(self, directory: Path, segment_bytes: int = 64 * 2**20) -> None:
        self._dir = directory
        self._segment_bytes = segment_bytes
        make_private_dir(directory)
        self._segments: list[tuple[int, Path]] | None = None  # (first seq, path), oldest first
        self._fd = -1  # the segment being appended to; -1: none
        self._size = 0  # its size, counting pending records
        self._pending: list[bytes] = []  # appended, not yet written
        # The durable size of the segment that was current at the last sync, and the segments
        # begun since: what a failure rolls back to.
        self._synced: tuple[Path, int] | None = None
        self._begun: list[Path] = []
        # Where each record of the last synced group and of the pending one starts (seq,
        # segment, offset): :meth:`discard_after` cuts records that were logged but never
        # applied. Only the newest group can hold such records: a group is logged only once
        # every step of the one before it was applied.
        self._synced_group: list[tuple[int, Path, int]] = []
        self._group: list[tuple[int, Path, int]] = []
        self._last_seq: int | None = None
        self._synced_seq: int | None = None
        self._rotate_pending = False
        self._dir_dirty = False
        self._failed = False

    @property
    def last_seq(self) -> int | None:
        """The newest logged step, or None for an empty log (which accepts any first seq)."""
        return self._last_seq

    def recover(self) -> list[WalRecord]:
        """Read every record in seq order, cut a torn tail and open the log for appending.

        Raises :class:`WalCorrupt` for a bad record before the last segment's tail or a seq that
        does not follow its predecessor.
        """
        if self._segments is not None:
            raise RuntimeError("the write-ahead log is already open")
        found = sorted(
            (int(m[1]), p) for p in self._dir.iterdir() if (m := _SEGMENT_NAME.fullmatch(p.name))
        )
        # Validate everything before modifying anything, so a corrupt log is left as it was found.
        records: list[WalRecord] = []
        expected: int | None = None
        scan = ScanResult([], 0, None)
        for i, (first_seq, path) in enumerate(found):
            data = path.read_bytes()
            scan = decode_records(data)
            if scan.error is not None and i < len(found) - 1:
                raise WalCorrupt(f"{path}: offset {scan.valid_bytes}: {scan.error}")
            if (
                scan.error is not None
                and (after := valid_frame_after(data, scan.valid_bytes)) is not None
            ):
                raise WalCorrupt(
                    f"{path}: offset {scan.valid_bytes}: {scan.error}, but an intact record "
                    f"follows at offset {after}: damage in the middle, not a torn tail"
                )
            if expected is not None and first_seq != expected:
                raise WalCorrupt(f"{path}: offset 0: segment starts at {first_seq}, not {expected}")
            expected = first_seq
            for record in scan.records:
                if record.seq != expected:
                    raise WalCorrupt(
                        f"{path}: offset {record.offset}: seq {record.seq}, expected {expected}"
                    )
                expected += 1
            records += scan.records

        for _, path in found:
            if path.stat().st_mode & 0o077:
                os.chmod(path, PRIVATE_FILE)  # written by a version that left them 0644
        self._segments = found
        self._rotate_pending = self._dir_dirty = self._failed = False
        self._pending = []
        self._begun = []
        self._synced = None
        self._synced_group = []
        self._group = []
        if found:
            path = found[-1][1]
            if scan.error is not None:
                logger.warning(
                    "cutting torn WAL tail: %s at offset %d: %s", path, scan.valid_bytes, scan.error
                )
            if scan.valid_bytes == 0:
                # An empty segment (a crash right after creating it) would pin its name's seq.
                path.unlink()
                fsync_directory(self._dir)
                found.pop()
            else:
                self._fd = fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                if scan.error is not None:
                    os.ftruncate(fd, scan.valid_bytes)
                    os.fsync(fd)
                os.lseek(fd, scan.valid_bytes, os.SEEK_SET)
                self._size = scan.valid_bytes
                self._synced = (path, scan.valid_bytes)
        self._last_seq = self._synced_seq = records[-1].seq if records else None
        return records

    def append(self, seq: int, tensors: Mapping[str, np.ndarray]) -> int:
        """Add one record (not yet written, see :meth:`sync`); returns its size in bytes."""
        return self.append_encoded(seq, encode_record(seq, tensors))

    def append_encoded(self, seq: int, record: bytes) -> int:
        """:meth:`append` for a record :func:`encode_record` made already (on another thread:
        encoding is Python work, writing is a system call that releases the GIL)."""
        segments = self._usable()
        if self._last_seq is not None and seq != self._last_seq + 1:
            raise ValueError(f"WAL seq {seq} does not follow {self._last_seq}")
        if self._fd < 0 or self._rotate_pending or self._size >= self._segment_bytes:
            try:
                self._start_segment(segments, seq)
            except BaseException:
                self._fail()
                raise
        self._group.append((seq, segments[-1][1], self._size))
        self._pending.append(record)
        self._size += len(record)
        self._last_seq = seq
        return len(record)

    def sync(self) -> None:
        """Write every appended record and make it durable: one write + fsync for the group.
        On failure, what was appended since the last sync is rolled back (see the class)."""
        segments = self._usable()
        if self._fd < 0:
            return
        try:
            self._write_pending()
            os.fsync(self._fd)
            if self._dir_dirty:
                fsync_directory(self._dir)
                self._dir_dirty = False
        except BaseException:
            # After a failed fsync the kernel may have dropped the dirty pages; a retry that
            # succeeds proves nothing, so the log refuses further use until recovered.
            self._fail()
            raise
        self._synced = (segments[-1][1], self._size)
        self._begun = []
        self._synced_seq = self._last_seq
        if self._group:
            self._synced_group = self._group
            self._group = []

    def rotate(self) -> None:
        """Start a new segment at the next append, so older ones can later be deleted whole."""
        self._rotate_pending = True

    def truncate_through(self, seq: int) -> list[Path]:
        """Delete the segments holding only records with seq <= ``seq``; returns their paths."""
        detached = self.detach_through(seq)
        delete_segments(detached)
        return detached

    def detach_through(self, seq: int) -> list[Path]:
        """Forget the segments holding only records with seq <= ``seq`` and return them, for
        :func:`delete_segments` on another thread: unlinking can be slow (a filesystem mounted
        with ``discard`` trims synchronously) and must not hold up appends."""
        segments = self._usable()
        detached: list[Path] = []
        # The last segment has no successor, so the one being appended to always survives.
        while len(segments) > 1 and segments[1][0] <= seq + 1:
            detached.append(segments.pop(0)[1])
        return detached

    def discard_after(self, seq: int) -> None:
        """Cut every record after ``seq`` and refuse further use: their steps failed, so their
        requests were answered with an error, and a replay must not apply them after all.

        Works after a failed sync too (which rolled back only what it had not synced)."""
        segments = self._segments
        if segments is None:
            raise RuntimeError("the write-ahead log is not open: call recover() first")
        self._failed = True
        self._pending = []
        cut = next((p for p in self._synced_group + self._group if p[0] > seq), None)
        self._synced_group = []
        self._group = []
        if cut is None:
            return
        _, path, offset = cut
        while segments and segments[-1][1] != path:
            segments.pop()[1].unlink(missing_ok=True)  # begun by the records cut
        truncate_durably(path, offset)
        fsync_directory(self._dir)
        logger.warning(
            "WAL %s cut at offset %d: records after %d were never applied", path, offset, seq
        )

    def close(self) -> None:
        """Sync (unless a write failed) and close; :meth:`recover` reopens the log."""
        try:
            if self._segments is not None and not self._failed:
                self.sync()
        finally:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1
            self._pending = []
            self._segments = None

    def _usable(self) -> list[tuple[int, Path]]:
        if self._segments is None:
            raise RuntimeError("the write-ahead log is not open: call recover() first")
        if self._failed:
            raise RuntimeError("an earlier WAL write failed; restart and recover")
        return self._segments

    def _write_pending(self) -> None:
        pending = self._pending
        if pending:
            _write_all(self._fd, pending[0] if len(pending) == 1 else b"".join(pending))
            self._pending = []

    def _start_segment(self, segments: list[tuple[int, Path]], first_seq: int) -> None:
        if self._fd >= 0:
            # sync() only fsyncs the current segment, so the one being left must be durable now.
            self._write_pending()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        path = self._dir / f"wal-{first_seq:016d}.log"
        # 0600: the log holds the clients' training data (the umask can only take bits away).
        self._fd = os.open(path, _SEGMENT_FLAGS, PRIVATE_FILE)
        segments.append((first_seq, path))
        self._begun.append(path)
        self._size = 0
        self._rotate_pending = False
        self._dir_dirty = True

    def _fail(self) -> None:
        """Roll back everything since the last successful sync and refuse further use.

        Those records were never acknowledged (their requests are answered with an error), so
        they must not be replayed: a client retrying its 503 would be trained on twice. A
        segment begun since is deleted; the one current at the last sync is cut back to the size
        it had then (by path: the descriptor may be what failed)."""
        self._failed = True
        self._pending = []
        self._group = []
        self._last_seq = self._synced_seq
        segments = self._segments
        try:
            for path in reversed(self._begun):
                path.unlink(missing_ok=True)
                if segments and segments[-1][1] == path:
                    segments.pop()
            if self._synced is not None:
                path, size = self._synced
                truncate_durably(path, size)
            if self._begun:
                fsync_directory(self._dir)
        except OSError:
            logger.exception(
                "could not roll back the WAL records written since the last sync in %s: they "
                "were answered with an error but may be replayed after a restart",
                self._dir,
            )
        self._begun = []
