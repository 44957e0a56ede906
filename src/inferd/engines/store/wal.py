"""Durability for the vector store: an append-only, fsynced log plus snapshots.

Why this shape: a StoresSet/StoresDelete is acknowledged only after its record is on
disk (``write`` + ``fdatasync``), so a ``kill -9`` (or power loss, for disks that
honour flushes) never loses an acknowledged write. Replaying the log on start rebuilds
the store. The log only grows, so past a threshold the whole store is written once as
a snapshot and the log starts over; both steps are atomic renames, so a crash at any
point leaves either the old (snapshot, log) pair or the new one.

Files in a store directory, ``G`` being a generation number:

* ``snapshot-G.bin``: the full store as of the start of generation G (absent for G=0);
* ``wal-G.log``: every Set/Delete applied after that snapshot, in order;
* ``LOCK``: ``flock``-ed while a process has the store open, so two servers cannot
  append to the same log (the kernel drops the lock when a process dies, even by -9).

Log record: ``u32 payload length, u32 crc32(payload), payload``. Payload: ``u8 op``
(``S`` set / ``D`` delete), ``u32 count, u32 dim``, ``count*dim`` little-endian
float32 keys, then for ``S`` ``count`` u32 value lengths and the value bytes. A record
cut short by a crash (short header, short payload, bad CRC) ends the log: it is never
acknowledged, so dropping it loses nothing. It is moved aside to ``wal-G.log.torn``
and the log is truncated, so later appends do not land after garbage.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inferd.errors import FailedPrecondition, InferdError, ResourceExhausted

log = logging.getLogger("inferd.store")

_REC_HEADER = struct.Struct("<II")  # payload length, crc32
_OP_HEADER = struct.Struct("<cII")  # op, count, dim
_SNAP_MAGIC = b"INFSNAP1"
_SNAP_HEADER = struct.Struct("<8sQI4x")  # magic, count, dim (-1 stored as 0xFFFFFFFF), pad
_LOG_MAGIC = b"INFWAL01"
_NAME_RE = re.compile(r"^(snapshot|wal)-(\d{8})\.(bin|log)$")


class StoreCorrupt(Exception):
    """A snapshot is unreadable: refuse to open rather than serve a silently empty store."""


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def storage_error(exc: OSError, directory: Path, what: str) -> InferdError:
    """A clear error for a failed write to a store directory (full, read-only, or other I/O).

    A full disk is ``ResourceExhausted`` (space may come back); a read-only or forbidden
    directory and other I/O failures are ``FailedPrecondition`` (an operator must act).
    """
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL:
        return ResourceExhausted(f"store directory {directory} is full ({reason}): {what}")
    if exc.errno in _READ_ONLY:
        return FailedPrecondition(f"store directory {directory} is not writable ({reason}): {what}")
    return FailedPrecondition(f"store directory {directory}: I/O error ({reason}): {what}")


@dataclass
class Record:
    """One replayed log record (keys are float32 ``(count, dim)``)."""

    op: bytes  # b"S" or b"D"
    keys: np.ndarray
    values: list[bytes] | None


@dataclass
class Snapshot:
    """A loaded snapshot: keys ``(n, dim)`` float32 and their values."""

    dim: int
    keys: np.ndarray
    values: list[bytes]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_set(keys: np.ndarray, values: list[bytes]) -> bytes:
    count, dim = keys.shape
    lengths = np.fromiter((len(v) for v in values), dtype="<u4", count=count)
    payload = b"".join(
        (_OP_HEADER.pack(b"S", count, dim), keys.astype("<f4", copy=False).tobytes(), lengths.tobytes(), *values)
    )
    return _REC_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def encode_delete(keys: np.ndarray) -> bytes:
    count, dim = keys.shape
    payload = _OP_HEADER.pack(b"D", count, dim) + keys.astype("<f4", copy=False).tobytes()
    return _REC_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _decode(payload: bytes) -> Record:
    op, count, dim = _OP_HEADER.unpack_from(payload, 0)
    pos = _OP_HEADER.size
    nkey = count * dim * 4
    keys = np.frombuffer(payload, dtype="<f4", count=count * dim, offset=pos).astype(np.float32).reshape(count, dim)
    pos += nkey
    if op == b"D":
        return Record(op, keys, None)
    if op != b"S":
        raise ValueError(f"unknown op {op!r}")
    lengths = np.frombuffer(payload, dtype="<u4", count=count, offset=pos)
    pos += 4 * count
    values: list[bytes] = []
    mv = memoryview(payload)
    for n in lengths.tolist():
        values.append(bytes(mv[pos : pos + n]))
        pos += n
    if pos != len(payload):
        raise ValueError("record length does not match its contents")
    return Record(op, keys, values)


class DurableLog:
    """The files of one store directory: replay on open, append+fsync, compaction."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(exc, self.dir, "cannot open the store for writing") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreCorrupt(f"store directory {self.dir} is in use by another process") from None
        self.generation = 0
        self._fd: int | None = None
        self.log_bytes = 0
        self.snapshot_bytes = 0
        self.broken: str | None = None  # set when the log's state on disk is unknown

    # ---- opening -------------------------------------------------------------------
    def _files(self) -> dict[tuple[str, int], Path]:
        found: dict[tuple[str, int], Path] = {}
        for p in self.dir.iterdir():
            m = _NAME_RE.match(p.name)
            if m:
                found[(m.group(1), int(m.group(2)))] = p
        return found

    def open(self) -> tuple[Snapshot | None, Iterator[Record]]:
        """Pick the newest complete generation; return its snapshot and its log records.

        The iterator must be consumed before ``append``; it truncates a torn tail.
        """
        files = self._files()
        snaps = sorted((g for kind, g in files if kind == "snapshot"), reverse=True)
        snapshot: Snapshot | None = None
        self.generation = 0
        if snaps:
            # A snapshot is renamed into place only once complete, so the newest one is
            # whole; a bad CRC means the disk corrupted it: refuse rather than lose data.
            self.generation = snaps[0]
            path = files[("snapshot", snaps[0])]
            snapshot = read_snapshot(path)
            self.snapshot_bytes = path.stat().st_size
        # Older generations and *.tmp files are leftovers of an interrupted compaction.
        for (_kind, g), p in files.items():
            if g < self.generation:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        for p in self.dir.glob("*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        return snapshot, self._replay()

    def _log_path(self, generation: int) -> Path:
        return self.dir / f"wal-{generation:08d}.log"

    def _replay(self) -> Iterator[Record]:
        path = self._log_path(self.generation)
        if not path.exists():
            self._create_log(self.generation)
            return
        data = path.read_bytes()
        good = 0
        if data[: len(_LOG_MAGIC)] == _LOG_MAGIC:
            good = pos = len(_LOG_MAGIC)
            while pos + _REC_HEADER.size <= len(data):
                length, crc = _REC_HEADER.unpack_from(data, pos)
                end = pos + _REC_HEADER.size + length
                if end > len(data):
                    break
                payload = data[pos + _REC_HEADER.size : end]
                if zlib.crc32(payload) != crc:
                    break
                try:
                    record = _decode(payload)
                except (ValueError, struct.error):
                    break
                yield record
                pos = good = end
        if good < len(data):
            torn = path.with_name(path.name + ".torn")
            torn.write_bytes(data[good:])
            log.warning("store %s: ignoring %d bytes of an unfinished log record (kept in %s)",
                        self.dir, len(data) - good, torn.name)
        fd = os.open(path, os.O_WRONLY)
        if good == 0:
            os.write(fd, _LOG_MAGIC)
            good = len(_LOG_MAGIC)
        os.ftruncate(fd, good)
        os.fsync(fd)
        os.lseek(fd, good, os.SEEK_SET)
        self._fd = fd
        self.log_bytes = good

    def _create_log(self, generation: int) -> None:
        path = self._log_path(generation)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, _LOG_MAGIC)
        os.fsync(fd)
        os.replace(tmp, path)
        _fsync_dir(self.dir)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self.log_bytes = len(_LOG_MAGIC)

    # ---- writing -------------------------------------------------------------------
    def append(self, record: bytes) -> None:
        """Write one record and flush it to disk before returning (the acknowledgement).

        On failure (disk full, read-only remount, I/O error) the partial record is cut off
        again, so the log ends with the last acknowledged write and later appends do not
        follow garbage; the caller gets a clear error and must not apply the write. If the
        cut fails too, the log refuses further writes until the store is reopened (replay
        drops a torn tail anyway), so nothing is ever acknowledged on top of garbage.
        """
        assert self._fd is not None, "open() and consume its records first"
        if self.broken:
            raise FailedPrecondition(self.broken)
        view = memoryview(record)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fdatasync(self._fd)
        except OSError as exc:
            self._cut_back(exc)
            raise storage_error(exc, self.dir, "the write was not applied; acknowledged writes are intact") from exc
        self.log_bytes += len(record)

    def _cut_back(self, cause: OSError) -> None:
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self.log_bytes)
            os.lseek(self._fd, self.log_bytes, os.SEEK_SET)
            os.fsync(self._fd)
        except OSError as exc:
            self.broken = (f"store directory {self.dir}: a failed write ({cause.strerror}) could not be "
                           f"cut off the log ({exc.strerror}); writes are refused until the store is "
                           f"reopened (LoadModel); acknowledged writes are intact")
            log.error("%s", self.broken)

    def compact(self, write_snapshot: Callable[[Path], None]) -> None:
        """Start generation G+1 from a snapshot of the current state, then drop G's files.

        ``write_snapshot(path)`` writes the complete current store to ``path``.
        """
        old = self.generation
        new = old + 1
        final = self.dir / f"snapshot-{new:08d}.bin"
        tmp = final.with_name(final.name + ".tmp")
        try:
            write_snapshot(tmp)
            os.replace(tmp, final)  # the commit point: from here on, open() picks G+1
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise storage_error(exc, self.dir, "compaction failed; the log goes on") from exc
        self.generation = new
        try:
            _fsync_dir(self.dir)
            self.snapshot_bytes = final.stat().st_size
            self._create_log(new)
        except OSError as exc:
            # The new snapshot holds every acknowledged write, but the old log stays open:
            # appending there would be lost on reopen, so refuse writes until then.
            self.broken = (f"store directory {self.dir}: compaction could not start a new log "
                           f"({exc.strerror}); writes are refused until the store is reopened "
                           f"(LoadModel); acknowledged writes are intact")
            raise storage_error(exc, self.dir, "compaction could not start a new log") from exc
        for name in (f"snapshot-{old:08d}.bin", f"wal-{old:08d}.log", f"wal-{old:08d}.log.torn"):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1


# ---- snapshots ---------------------------------------------------------------------
def write_snapshot(path: Path, dim: int, keys: np.ndarray, values: list[bytes]) -> None:
    """Write ``keys``/``values`` to ``path`` with a trailing CRC, fsynced."""
    n = len(values)
    offsets = np.zeros(n + 1, dtype="<u8")
    if n:
        np.cumsum(np.fromiter((len(v) for v in values), dtype=np.uint64, count=n), out=offsets[1:])
    crc = 0
    with open(path, "wb") as f:

        def put(chunk: bytes | memoryview) -> None:
            nonlocal crc
            crc = zlib.crc32(chunk, crc)
            f.write(chunk)

        put(_SNAP_HEADER.pack(_SNAP_MAGIC, n, dim & 0xFFFFFFFF))
        if keys.size:  # an empty store has a (0, 0) key matrix, which memoryview cannot cast
            put(memoryview(np.ascontiguousarray(keys, dtype="<f4")).cast("B"))
        put(offsets.tobytes())
        batch: list[bytes] = []
        size = 0
        for v in values:
            batch.append(v)
            size += len(v)
            if size >= 1 << 22:
                put(b"".join(batch))
                batch, size = [], 0
        if batch:
            put(b"".join(batch))
        f.write(struct.pack("<I", crc))
        f.flush()
        os.fsync(f.fileno())


def read_snapshot(path: Path) -> Snapshot:
    data = path.read_bytes()
    if len(data) < _SNAP_HEADER.size + 4:
        raise StoreCorrupt(f"{path}: truncated snapshot")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(memoryview(data)[:-4]) != crc:
        raise StoreCorrupt(f"{path}: snapshot checksum mismatch")
    magic, n, dim = _SNAP_HEADER.unpack_from(data, 0)
    if magic != _SNAP_MAGIC:
        raise StoreCorrupt(f"{path}: not a store snapshot")
    dim = -1 if dim == 0xFFFFFFFF else dim
    pos = _SNAP_HEADER.size
    width = max(dim, 0)
    keys = np.frombuffer(data, dtype="<f4", count=n * width, offset=pos).astype(np.float32).reshape(n, width)
    pos += n * width * 4
    offsets = np.frombuffer(data, dtype="<u8", count=n + 1, offset=pos)
    pos += (n + 1) * 8
    mv = memoryview(data)
    off = offsets.tolist()
    values = [bytes(mv[pos + off[i] : pos + off[i + 1]]) for i in range(n)]
    return Snapshot(dim, keys, values)
