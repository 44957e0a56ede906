"""An in-process vector store with LocalAI local-store semantics, optionally durable.

Semantics (LocalAI ``backend/go/local-store/store.go``): keys are float32 vectors of one
dimension, values are bytes. Set upserts; Get returns the pairs found (missing keys are
left out, not an error) in ascending key order; Delete removes and ignores missing keys;
Find returns the ``top_k`` entries most similar to a query by cosine similarity, most
similar first. The dimension is fixed by the first key and reopens when the store
becomes empty. Beyond LocalAI, keys with NaN/inf and zero vectors (cosine undefined)
are refused, and a Set batch with a repeated key keeps the last value (LocalAI's merge
would store the key twice).

This class is the facade: one lock around every call, and the durable log written before
a change is applied. The work is in one module per concern:

* ``validation``: request vectors and sizes (InvalidArgument naming the field);
* ``keytable``: the rows (keys, norms, int8 codes, values, exact-key lookup);
* ``similarity``: the one arithmetic every reported similarity goes through (exactly
  symmetric: ``find(a)`` reporting ``b`` and ``find(b)`` reporting ``a`` agree bit for bit);
* ``scan``: the exact Find (an int8 scan, then exact re-scoring, certified by an error bound);
* ``ann`` / ``ann_lifecycle``: the HNSW index and when it is built and used;
* ``wal``: the fsynced log and snapshots; ``blas``: the BLAS thread count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferd.engines.store import similarity, validation
from inferd.engines.store.ann_lifecycle import AnnLifecycle
from inferd.engines.store.keytable import KeyTable, key_hash
from inferd.engines.store.scan import Scanner, exact_top_k
from inferd.engines.store.validation import KeysLike
from inferd.engines.store.wal import DurableLog, encode_delete, encode_set, write_snapshot
from inferd.errors import InferdError, InvalidArgument

log = logging.getLogger("inferd.store")

#: How long close() (Free, LoadModel of another store) waits for an abandoned index build.
CLOSE_WAIT_S = 5.0


@dataclass(frozen=True)
class StoreConfig:
    """Tunables; the backend fills them from LoadModel's ``Options`` (``key:value``)."""

    ann: str = "hnsw"  # "hnsw" or "off"
    ann_threshold: int = 50_000  # entries before an ANN index is built
    ann_recall: float = 0.98  # recall@10 the calibrated ef must reach
    ann_max_topk: int = 256  # larger TopK always scans exactly
    ann_time_ratio: float = 0.5  # use ANN only if it takes at most this fraction of a scan
    ann_m: int = 16
    ann_ef_construction: int = 100
    ann_background: bool = True  # build in a thread (False: inside the call that needs it)
    ann_build_threads: int = 1  # hnswlib threads for a background build
    ann_build_nice: int = 19  # the builder thread's nice value (0: normal priority)
    ann_probe_size: int = 8_000  # sample for the early "will the index help?" probe (0: no probe)
    scan: str = "int8"  # exact Find's candidate scan: int8 (SimSIMD) or float32 (BLAS)
    scan_threads: int = 1  # threads of that scan
    compact_bytes: int = 64 << 20  # compact when the log exceeds this ...
    compact_ratio: float = 1.0  # ... and this fraction of the snapshot's size


@dataclass(frozen=True)
class FindResult:
    keys: np.ndarray  # (k, dim) float32
    values: list[bytes]
    similarities: np.ndarray  # (k,) float32, descending
    method: str  # "exact" or "ann"


class VectorStore:
    """See the module docstring. ``path=None`` keeps everything in memory."""

    def __init__(self, path: str | Path | None = None, config: StoreConfig | None = None) -> None:
        self.config = config or StoreConfig()
        self._lock = threading.RLock()
        self._scanner = Scanner(self.config.scan, self.config.scan_threads)
        self._table = KeyTable(with_codes=self._scanner.kind == "int8")
        self._ann = AnnLifecycle(self.config, self._lock, self._table, self._exact_rows)
        self._compact_after = 0  # log size below which a failed compaction is not retried
        self._wal: DurableLog | None = None
        if path is not None:
            self._wal = DurableLog(path)
            try:
                self._replay()
            except BaseException:
                self._wal.close()
                raise

    # ---- public API ------------------------------------------------------------------
    def __len__(self) -> int:
        return self._table.n

    @property
    def dim(self) -> int:
        return self._table.dim

    @property
    def durable(self) -> bool:
        return self._wal is not None

    @property
    def scan_kind(self) -> str:
        return self._scanner.kind

    def set(self, keys: KeysLike, values: Sequence[bytes]) -> None:
        """Upsert ``keys[i] -> values[i]``; durable once this returns."""
        if len(keys) == 0:
            raise InvalidArgument("no keys to set", "Keys")
        if len(keys) != len(values):
            raise InvalidArgument(f"{len(keys)} keys but {len(values)} values", "Values")
        with self._lock:
            mat = validation.key_matrix(keys, "Keys", self._table.dim)
            row_norms = similarity.norms(mat)
            validation.check_nonzero(row_norms, "Keys")
            vals = [bytes(v) for v in values]
            hashes = [key_hash(row) for row in mat]
            if len(set(hashes)) != len(hashes):  # a repeated key (or a hash collision): slow path
                mat, vals = validation.last_wins(mat, vals)
                hashes = [key_hash(row) for row in mat]
                row_norms = similarity.norms(mat)
            if self._wal is not None:
                self._wal.append(encode_set(mat, vals))  # raises (and nothing is applied) on failure
            start, end = self._table.upsert(mat, vals, hashes, row_norms)
            self._ann.on_added(start, end)
            self._after_write()

    def get(self, keys: KeysLike) -> tuple[np.ndarray, list[bytes]]:
        """The stored (keys, values) among ``keys``, in ascending key order, missing ones left out."""
        with self._lock:
            t = self._table
            if t.n == 0 or len(keys) == 0:
                return np.empty((0, max(t.dim, 0)), dtype=np.float32), []
            mat = validation.key_matrix(keys, "Keys", t.dim)
            rows = sorted({r for r in (t.find_row(k) for k in mat) if r >= 0})
            found = t.keys[rows].copy()
            vals = [t.values[r] for r in rows]
            if len(rows) > 1:
                order = np.lexsort(found.T[::-1])
                found = found[order]
                vals = [vals[i] for i in order.tolist()]
            return found, vals

    def delete(self, keys: KeysLike) -> int:
        """Remove ``keys`` (missing ones are ignored); durable once this returns. Returns the count removed."""
        if len(keys) == 0:
            raise InvalidArgument("no keys to delete", "Keys")
        with self._lock:
            t = self._table
            mat = validation.key_matrix(keys, "Keys", t.dim)
            if t.n == 0:
                return 0
            present: list[int] = []
            seen: set[int] = set()
            for i, k in enumerate(mat):
                r = t.find_row(k)
                if r >= 0 and r not in seen:
                    seen.add(r)
                    present.append(i)
            if not present:
                return 0
            gone = mat[present]
            if self._wal is not None:
                self._wal.append(encode_delete(gone))
            removed = self._apply_delete(gone)
            self._after_write()
            return removed

    def find(self, query: Sequence[float] | np.ndarray, top_k: int, max_reply_bytes: int | None = None,
             exact: bool = False) -> FindResult:
        """The ``top_k`` entries most similar to ``query`` (cosine), most similar first.

        ``max_reply_bytes``: refuse (InvalidArgument on TopK) a result that could not be
        sent in one message. ``exact``: never use the ANN index.
        """
        top_k = validation.top_k(top_k)
        with self._lock:
            t = self._table
            q = validation.key_matrix(np.asarray(query, dtype=np.float32).reshape(1, -1), "Key", t.dim)
            q_norm = similarity.norms(q)
            validation.check_nonzero(q_norm, "Key")
            if t.n == 0:
                return FindResult(np.empty((0, max(t.dim, 0)), dtype=np.float32), [], np.empty(0, np.float32), "exact")
            q_unit = similarity.unit(q, q_norm)[0]
            k = min(top_k, t.n)
            validation.check_reply_size(k, t.dim, 0, max_reply_bytes)  # keys alone: refuse before the work
            rows = None
            method = "exact"
            if not exact and self._ann.usable(k):
                rows = self._ann.rows(q_unit.astype(np.float32), k)
            if rows is not None:
                method = "ann"
                sims = t.cosine(rows, q_unit)
            else:
                rows, sims = self._exact_rows(q_unit, k)
            order = np.lexsort((t.ids[rows], -sims))[:k]
            rows, sims = rows[order], sims[order]
            values = [t.values[r] for r in rows.tolist()]
            validation.check_reply_size(len(rows), t.dim, sum(len(v) for v in values), max_reply_bytes)
            return FindResult(t.keys[rows].copy(), values, sims.astype(np.float32), method)

    def exact_find(self, query: np.ndarray, top_k: int) -> FindResult:
        """Find with the exact scan even when an ANN index is in use (benchmarks, recall checks)."""
        return self.find(query, top_k, exact=True)

    def stats(self) -> dict[str, Any]:
        """Sizes and index state. Lock-free (plain attribute reads, O(1)) on purpose: the
        server answers Status from its event loop, which must not wait for a long write."""
        t, ann_index, wal = self._table, self._ann.index, self._wal
        out: dict[str, Any] = {
            "entries": t.n,
            "dim": t.dim,
            "key_bytes": int(t.keys.nbytes),
            "scan_bytes": int(t.codes.nbytes),
            "scan": self._scanner.kind,
            "value_bytes": t.value_bytes,
            "ann": self._ann.status,
            "ann_ef": self._ann.ef,
            "ann_building": self._ann.running() is not None,
        }
        if ann_index is not None:
            out["ann_bytes"] = ann_index.nbytes()
        if wal is not None:
            out.update(generation=wal.generation, log_bytes=wal.log_bytes, snapshot_bytes=wal.snapshot_bytes)
        return out

    def wait_for_index(self, timeout: float | None = None) -> bool:
        """Block until a background ANN build finishes (tests, benchmarks). True if none runs."""
        t = self._ann.running()
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            return not t.is_alive()
        return True

    def build_index_now(self) -> None:
        """Build (or rebuild) the ANN index synchronously regardless of the threshold."""
        with self._lock:
            if self._ann.enabled and self._table.n:
                self._ann.start(background=False)

    def compact(self) -> None:
        """Write a snapshot and start a fresh log now (normally automatic)."""
        with self._lock:
            if self._wal is not None:
                self._compact()

    def close(self) -> None:
        """Close the log; an index build in progress is abandoned (it stops at its next chunk)."""
        with self._lock:
            builder = self._ann.abandon()
        if builder is not None and builder is not threading.current_thread():
            builder.join(CLOSE_WAIT_S)
            if builder.is_alive():  # a niced builder on a busy machine: it gives up on its own
                log.warning("store: the index builder is still finishing a chunk; not waiting for it")
        with self._lock:
            if self._wal is not None:
                self._wal.close()
                self._wal = None

    # ---- internals -------------------------------------------------------------------
    def _exact_rows(self, q_unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-k (rows, similarities), unsorted: scan, then certified re-scoring."""
        t = self._table
        approx, bound = self._scanner.scores(t, q_unit)
        return exact_top_k(approx, bound, k, lambda rows: t.cosine(rows, q_unit))

    def _apply_delete(self, mat: np.ndarray) -> int:
        removed = self._table.delete(mat)
        self._ann.on_removed(removed)
        if self._table.n == 0:
            self._ann.on_cleared()
        return len(removed)

    def _after_write(self) -> None:
        w = self._wal
        if w is not None and w.log_bytes > max(self.config.compact_bytes, self._compact_after) \
                and w.log_bytes > self.config.compact_ratio * w.snapshot_bytes:
            try:
                self._compact()
            except InferdError as exc:
                # The write that got here is already acknowledged-safe in the log; a failed
                # compaction only means the log keeps growing. Retry when it has doubled.
                self._compact_after = w.log_bytes * 2
                log.warning("store: %s", exc.message)
        self._ann.after_write()

    def _compact(self) -> None:
        assert self._wal is not None
        t0 = time.perf_counter()
        t = self._table
        n, dim = t.n, t.dim
        self._wal.compact(lambda p: write_snapshot(p, dim, t.keys[:n], t.values[:n]))
        self._compact_after = 0
        log.info("store %s: compacted %d entries into generation %d in %.2fs",
                 self._wal.dir, n, self._wal.generation, time.perf_counter() - t0)

    def _replay(self) -> None:
        assert self._wal is not None
        t0 = time.perf_counter()
        snapshot, records = self._wal.open()
        if snapshot is not None and len(snapshot.values):
            self._table.upsert(snapshot.keys, snapshot.values)
        count = 0
        for rec in records:
            count += 1
            if rec.op == b"S":
                assert rec.values is not None
                self._table.upsert(rec.keys, rec.values)
            elif self._table.n:
                self._apply_delete(rec.keys)
        log.info("store %s: loaded %d entries (snapshot + %d log records) in %.2fs",
                 self._wal.dir, self._table.n, count, time.perf_counter() - t0)
        self._after_write()


__all__ = ["FindResult", "StoreConfig", "VectorStore"]
