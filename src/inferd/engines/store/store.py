"""An in-process vector store with LocalAI local-store semantics, optionally durable.

Semantics (LocalAI ``backend/go/local-store/store.go``): keys are float32 vectors of one
dimension, values are bytes. Set upserts; Get returns the pairs found (missing keys are
left out, not an error) in ascending key order; Delete removes and ignores missing keys;
Find returns the ``top_k`` entries most similar to a query by cosine similarity, most
similar first. The dimension is fixed by the first key and reopens when the store
becomes empty. Beyond LocalAI, keys with NaN/inf and zero vectors (cosine undefined)
are refused, and a Set batch with a repeated key keeps the last value (LocalAI's merge
would store the key twice).

Layout, chosen for Find speed: keys live in one contiguous float32 matrix (rows grown
by doubling, deletes swap the last row in) with a per-row 1/norm, so the exact Find is
one BLAS matrix-vector product, a scale and an ``argpartition``, and nothing is rebuilt
per query. A dict from the key's hash to its row gives O(1) exact-key lookups without
keeping a second copy of every key as bytes. Above ``ann_threshold`` entries an HNSW
index (built in a background thread, then updated on every Set/Delete) answers Find
when its calibrated recall@10 reaches ``ann_recall``; its candidates are re-scored
against the matrix, so similarities are always exact.

Thread-safety: every public method takes one lock; the index builder takes it only to
copy chunks and to publish, so calls keep being answered while it builds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferd.engines.store import ann as ann_mod
from inferd.engines.store.wal import DurableLog, encode_delete, encode_set, write_snapshot

log = logging.getLogger("inferd.store")

KeysLike = np.ndarray | Sequence[Sequence[float]]


class StoreInputError(ValueError):
    """A request argument is invalid; ``field`` names it (the backend's InvalidArgument)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.message = message
        self.field = field


@dataclass(frozen=True)
class StoreConfig:
    """Tunables; the backend fills them from LoadModel's ``Options`` (``key:value``)."""

    ann: str = "hnsw"  # "hnsw" or "off"
    ann_threshold: int = 50_000  # entries before an ANN index is built
    ann_recall: float = 0.98  # recall@10 the calibrated ef must reach
    ann_max_topk: int = 256  # larger TopK always scans exactly
    ann_time_ratio: float = 0.5  # use ANN only if it takes at most this fraction of a scan
    scan_threads: int = 1  # BLAS threads for the exact scan (0: leave BLAS's default)
    ann_m: int = 16
    ann_ef_construction: int = 100
    ann_background: bool = True  # build in a thread (False: inside the call that needs it)
    compact_bytes: int = 64 << 20  # compact when the log exceeds this ...
    compact_ratio: float = 1.0  # ... and this fraction of the snapshot's size


@dataclass(frozen=True)
class FindResult:
    keys: np.ndarray  # (k, dim) float32
    values: list[bytes]
    similarities: np.ndarray  # (k,) float32, descending
    method: str  # "exact" or "ann"


def _hash(row: np.ndarray) -> int:
    return hash(row.tobytes())


class VectorStore:
    """See the module docstring. ``path=None`` keeps everything in memory."""

    def __init__(self, path: str | Path | None = None, config: StoreConfig | None = None) -> None:
        self.config = config or StoreConfig()
        self._lock = threading.RLock()
        self.dim = -1
        self._n = 0
        self._keys = np.empty((0, 0), dtype=np.float32)
        self._inv = np.empty(0, dtype=np.float32)
        self._ids = np.empty(0, dtype=np.int64)  # row -> stable id
        self._row_of_id = np.empty(0, dtype=np.int64)  # id -> row, -1 when gone
        self._next_id = 0
        self._values: list[bytes] = []
        self._value_bytes = 0
        self._buckets: dict[int, int | list[int]] = {}
        # ANN state
        self._ann: ann_mod.HnswIndex | None = None
        self._ann_ef: int | None = None
        self._ann_status = "off" if self.config.ann == "off" else "not built (below threshold)"
        if self.config.ann != "off" and not ann_mod.available():
            self._ann_status = "unavailable (hnswlib is not installed): exact scan only"
        self._ann_building: threading.Thread | None = None
        self._ann_build_deleted: list[int] = []
        self._ann_retry_at = self.config.ann_threshold
        self._generation = 0  # bumps on clear/close so a stale builder never publishes
        self._closed = False
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
        return self._n

    @property
    def durable(self) -> bool:
        return self._wal is not None

    def set(self, keys: KeysLike, values: Sequence[bytes]) -> None:
        """Upsert ``keys[i] -> values[i]``; durable once this returns."""
        if len(keys) == 0:
            raise StoreInputError("no keys to set", "Keys")
        if len(keys) != len(values):
            raise StoreInputError(f"{len(keys)} keys but {len(values)} values", "Values")
        with self._lock:
            mat = self._matrix(keys, "Keys", self.dim)
            _check_nonzero(mat, "Keys")
            vals = [bytes(v) for v in values]
            hashes = [_hash(row) for row in mat]
            if len(set(hashes)) != len(hashes):  # a repeated key (or a hash collision): slow path
                mat, vals = _last_wins(mat, vals)
                hashes = [_hash(row) for row in mat]
            if self._wal is not None:
                self._wal.append(encode_set(mat, vals))
            self._apply_set(mat, vals, hashes)
            self._after_write()

    def get(self, keys: KeysLike) -> tuple[np.ndarray, list[bytes]]:
        """The stored (keys, values) among ``keys``, in ascending key order, missing ones left out."""
        with self._lock:
            if self._n == 0 or len(keys) == 0:
                return np.empty((0, max(self.dim, 0)), dtype=np.float32), []
            mat = self._matrix(keys, "Keys", self.dim)
            rows = sorted({r for r in (self._find_row(k) for k in mat) if r >= 0})
            found = self._keys[rows].copy()
            vals = [self._values[r] for r in rows]
            if len(rows) > 1:
                order = np.lexsort(found.T[::-1])
                found = found[order]
                vals = [vals[i] for i in order.tolist()]
            return found, vals

    def delete(self, keys: KeysLike) -> int:
        """Remove ``keys`` (missing ones are ignored); durable once this returns. Returns the count removed."""
        if len(keys) == 0:
            raise StoreInputError("no keys to delete", "Keys")
        with self._lock:
            mat = self._matrix(keys, "Keys", self.dim)
            if self._n == 0:
                return 0
            present: list[int] = []
            seen: set[int] = set()
            for i, k in enumerate(mat):
                r = self._find_row(k)
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

    def find(self, query: Sequence[float] | np.ndarray, top_k: int) -> FindResult:
        """The ``top_k`` entries most similar to ``query`` (cosine), most similar first."""
        if top_k < 1:
            raise StoreInputError(f"must be >= 1, got {top_k}", "TopK")
        with self._lock:
            if self._n == 0:
                return FindResult(np.empty((0, max(self.dim, 0)), dtype=np.float32), [], np.empty(0, np.float32), "exact")
            q = self._matrix([query] if not isinstance(query, np.ndarray) else query.reshape(1, -1), "Key", self.dim)[0]
            _check_nonzero(q.reshape(1, -1), "Key")
            qn = float(np.linalg.norm(q.astype(np.float64)))
            unit = (q / qn).astype(np.float32)
            k = min(top_k, self._n)
            rows, method = None, "exact"
            if self._ann_usable(k):
                rows = self._ann_rows(unit, k)
                method = "ann"
            if rows is None:
                with blas_threads(self.config.scan_threads):
                    rows = self._exact_rows(unit, k)
                method = "exact"
            sims = (self._keys[rows] @ unit) * self._inv[rows]
            order = np.argsort(-sims, kind="stable")
            rows = rows[order]
            sims = np.clip(sims[order], -1.0, 1.0).astype(np.float32)
            return FindResult(self._keys[rows].copy(), [self._values[r] for r in rows.tolist()], sims, method)

    def exact_find(self, query: np.ndarray, top_k: int) -> FindResult:
        """Find with the exact scan even when an ANN index is in use (benchmarks, recall checks)."""
        with self._lock:
            saved, self._ann_ef = self._ann_ef, None
            try:
                return self.find(query, top_k)
            finally:
                self._ann_ef = saved

    def stats(self) -> dict[str, Any]:
        """Sizes and index state. Lock-free (plain attribute reads, O(1)) on purpose: the
        server answers Status from its event loop, which must not wait for a long write."""
        ann, wal = self._ann, self._wal
        out: dict[str, Any] = {
            "entries": self._n,
            "dim": self.dim,
            "key_bytes": int(self._keys.nbytes),
            "value_bytes": self._value_bytes,
            "ann": self._ann_status,
            "ann_ef": self._ann_ef,
        }
        if ann is not None:
            out["ann_bytes"] = ann.nbytes()
        if wal is not None:
            out.update(generation=wal.generation, log_bytes=wal.log_bytes, snapshot_bytes=wal.snapshot_bytes)
        return out

    def wait_for_index(self, timeout: float | None = None) -> bool:
        """Block until a background ANN build finishes (tests, benchmarks). True if none runs."""
        t = self._ann_building
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    def build_index_now(self) -> None:
        """Build (or rebuild) the ANN index synchronously regardless of the threshold."""
        with self._lock:
            if self.config.ann == "off" or self._n == 0 or not ann_mod.available():
                return
            self._start_build(background=False)

    def compact(self) -> None:
        """Write a snapshot and start a fresh log now (normally automatic)."""
        with self._lock:
            if self._wal is not None:
                self._compact()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._generation += 1
            builder = self._ann_building
        if builder is not None:
            builder.join()
        with self._lock:
            if self._wal is not None:
                self._wal.close()
                self._wal = None
            self._ann = None

    # ---- validation ------------------------------------------------------------------
    @staticmethod
    def _matrix(keys: KeysLike, field: str, dim: int) -> np.ndarray:
        """Keys as a C-contiguous float32 (n, dim) matrix, checked for shape and finiteness."""
        if isinstance(keys, np.ndarray):
            mat = keys.astype(np.float32, copy=False)
            if mat.ndim != 2:
                raise StoreInputError("expected a list of vectors", field)
        else:
            lengths = [len(k) for k in keys]
            first = lengths[0]
            for i, n in enumerate(lengths):
                if n != first:
                    raise StoreInputError(f"key {i} has {n} dimensions but key 0 has {first}", field)
            mat = np.array(keys, dtype=np.float32).reshape(len(lengths), first)
        if dim >= 0 and mat.shape[1] != dim:
            raise StoreInputError(f"key length {mat.shape[1]} does not match the store's dimension {dim}", field)
        if mat.shape[1] == 0:
            raise StoreInputError("empty key (0 dimensions)", field)
        finite = np.isfinite(mat).all(axis=1)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            name = f"{field}[{bad}]" if field == "Keys" else field
            raise StoreInputError("contains NaN or infinity", name)
        # -0.0 and 0.0 are the same key (as in LocalAI's slices.Compare): store +0.0 only.
        mat = np.ascontiguousarray(mat) + np.float32(0.0)
        return mat

    # ---- internals: rows and lookups -------------------------------------------------------
    def _find_row(self, key: np.ndarray) -> int:
        return self._find_row_h(_hash(key), key)

    def _bucket_add(self, h: int, row: int) -> None:
        b = self._buckets.get(h)
        if b is None:
            self._buckets[h] = row
        elif isinstance(b, int):
            self._buckets[h] = [b, row]
        else:
            b.append(row)

    def _bucket_replace(self, h: int, old: int, new: int | None) -> None:
        b = self._buckets[h]
        if isinstance(b, int):
            if new is None:
                del self._buckets[h]
            else:
                self._buckets[h] = new
            return
        b.remove(old)
        if new is not None:
            b.append(new)
        if len(b) == 1:
            self._buckets[h] = b[0]

    def _reserve(self, extra: int, dim: int) -> None:
        need = self._n + extra
        if self._keys.shape[1] != dim:  # only when empty: the dimension was (re)opened
            self._keys = np.empty((0, dim), dtype=np.float32)
        cap = self._keys.shape[0]
        if need <= cap:
            return
        # Doubling: every reallocation touches fresh pages, and page faults are costly in a VM.
        new_cap = max(need, cap * 2, 1024)
        keys = np.empty((new_cap, dim), dtype=np.float32)
        keys[: self._n] = self._keys[: self._n]
        inv = np.empty(new_cap, dtype=np.float32)
        inv[: self._n] = self._inv[: self._n]
        ids = np.empty(new_cap, dtype=np.int64)
        ids[: self._n] = self._ids[: self._n]
        self._keys, self._inv, self._ids = keys, inv, ids

    def _new_ids(self, count: int) -> np.ndarray:
        start = self._next_id
        self._next_id += count
        if self._next_id > len(self._row_of_id):
            grown = np.full(max(self._next_id, len(self._row_of_id) * 2, 1024), -1, dtype=np.int64)
            grown[: len(self._row_of_id)] = self._row_of_id
            self._row_of_id = grown
        return np.arange(start, start + count, dtype=np.int64)

    def _apply_set(self, mat: np.ndarray, vals: list[bytes], hashes: list[int] | None = None) -> None:
        """Upsert an already validated, de-duplicated batch (``hashes``: its keys' hashes, if known)."""
        if self.dim < 0:
            self.dim = mat.shape[1]
        if hashes is None:
            hashes = [_hash(row) for row in mat]
        new_rows: list[int] = []
        new_hashes: list[int] = []
        buckets = self._buckets
        for i, h in enumerate(hashes):
            if h not in buckets:
                new_rows.append(i)
                new_hashes.append(h)
                continue
            key = mat[i]
            r = self._find_row_h(h, key)
            if r >= 0:
                self._value_bytes += len(vals[i]) - len(self._values[r])
                self._values[r] = vals[i]  # same key, same vector: only the value changes
            else:
                new_rows.append(i)
                new_hashes.append(h)
        if not new_rows:
            return
        add = mat if len(new_rows) == len(mat) else mat[new_rows]
        self._reserve(len(new_rows), self.dim)
        start = self._n
        end = start + len(new_rows)
        self._keys[start:end] = add
        self._inv[start:end] = 1.0 / _norms(add)
        ids = self._new_ids(len(new_rows))
        self._ids[start:end] = ids
        self._row_of_id[ids] = np.arange(start, end)
        for j, i in enumerate(new_rows):
            self._values.append(vals[i])
            self._value_bytes += len(vals[i])
            self._bucket_add(new_hashes[j], start + j)
        self._n = end
        if self._ann is not None:
            self._ann.add(add * self._inv[start:end, None], ids)

    def _find_row_h(self, h: int, key: np.ndarray) -> int:
        b = self._buckets.get(h)
        if b is None:
            return -1
        if isinstance(b, int):
            return b if np.array_equal(self._keys[b], key) else -1
        for r in b:
            if np.array_equal(self._keys[r], key):
                return r
        return -1

    def _apply_delete(self, mat: np.ndarray) -> int:
        removed_ids: list[int] = []
        for key in mat:
            h = _hash(key)
            r = self._find_row_h(h, key)
            if r < 0:
                continue
            last = self._n - 1
            self._value_bytes -= len(self._values[r])
            removed_ids.append(int(self._ids[r]))
            self._row_of_id[self._ids[r]] = -1
            if r != last:
                moved_h = _hash(self._keys[last])
                self._bucket_replace(h, r, None)
                self._keys[r] = self._keys[last]
                self._inv[r] = self._inv[last]
                self._ids[r] = self._ids[last]
                self._values[r] = self._values[last]
                self._row_of_id[self._ids[r]] = r
                self._bucket_replace(moved_h, last, r)
            else:
                self._bucket_replace(h, r, None)
            self._values.pop()
            self._n = last
        if removed_ids:
            if self._ann is not None:
                self._ann.remove(removed_ids)
            if self._ann_building is not None:
                self._ann_build_deleted.extend(removed_ids)
        if self._n == 0:
            self._reset()
        return len(removed_ids)

    def _reset(self) -> None:
        """Back to the initial state: an empty store accepts keys of any dimension again."""
        self.dim = -1
        self._keys = np.empty((0, 0), dtype=np.float32)
        self._inv = np.empty(0, dtype=np.float32)
        self._ids = np.empty(0, dtype=np.int64)
        self._values = []
        self._value_bytes = 0
        self._buckets = {}
        self._ann = None
        self._ann_ef = None
        self._generation += 1  # abandons a running build
        self._ann_retry_at = self.config.ann_threshold
        if self.config.ann != "off" and ann_mod.available():
            self._ann_status = "not built (below threshold)"

    # ---- internals: find -------------------------------------------------------------
    def _exact_rows(self, unit: np.ndarray, k: int) -> np.ndarray:
        n = self._n
        sims = self._keys[:n] @ unit
        sims *= self._inv[:n]
        if k >= n:
            return np.arange(n)
        return np.argpartition(sims, n - k)[n - k :]

    def _exact_topk_ids(self, queries: np.ndarray, k: int, exclude_rows: np.ndarray | None = None) -> np.ndarray:
        """Exact top-k entry ids for unit queries, in chunks (calibration), skipping ``exclude_rows``."""
        n = self._n
        out = np.empty((len(queries), k), dtype=np.int64)
        for s in range(0, len(queries), 16):
            sims = queries[s : s + 16] @ self._keys[:n].T
            sims *= self._inv[:n]
            if exclude_rows is not None:
                sims[:, exclude_rows] = -np.inf
            part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            for j, row in enumerate(part):
                order = np.argsort(-sims[j, row], kind="stable")
                out[s + j] = self._ids[row[order]]
        return out

    def _ann_usable(self, k: int) -> bool:
        if self._ann_ef is None or self._ann is None:
            return False
        return k <= self.config.ann_max_topk and k * 4 <= self._ann.live

    def _ann_rows(self, unit: np.ndarray, k: int) -> np.ndarray | None:
        assert self._ann is not None and self._ann_ef is not None
        try:
            ids = self._ann.search(unit, k, ef=max(self._ann_ef, k))
        except RuntimeError:  # hnswlib: fewer than k reachable live entries
            return None
        rows = self._row_of_id[ids]
        if (rows < 0).any():  # cannot happen (deletes are marked), but never return a ghost
            return None
        return rows

    # ---- internals: writes, compaction, index lifecycle ----------------------------------------
    def _after_write(self) -> None:
        if self._wal is not None:
            w = self._wal
            if w.log_bytes > self.config.compact_bytes and w.log_bytes > self.config.compact_ratio * w.snapshot_bytes:
                self._compact()
        if (
            self.config.ann != "off"
            and self._ann is None
            and self._ann_building is None
            and self._n >= max(self.config.ann_threshold, self._ann_retry_at)
            and ann_mod.available()
        ):
            self._start_build(background=self.config.ann_background)

    def _compact(self) -> None:
        assert self._wal is not None
        t0 = time.perf_counter()
        n, dim = self._n, self.dim
        self._wal.compact(lambda p: write_snapshot(p, dim, self._keys[:n], self._values[:n]))
        log.info("store %s: compacted %d entries into generation %d in %.2fs",
                 self._wal.dir, n, self._wal.generation, time.perf_counter() - t0)

    def _replay(self) -> None:
        assert self._wal is not None
        t0 = time.perf_counter()
        snapshot, records = self._wal.open()
        if snapshot is not None and len(snapshot.values):
            self._apply_set(snapshot.keys, snapshot.values)
        count = 0
        for rec in records:
            count += 1
            if rec.op == b"S":
                assert rec.values is not None
                self._apply_set(rec.keys, rec.values)
            elif self._n:
                self._apply_delete(rec.keys)
        log.info("store %s: loaded %d entries (snapshot + %d log records) in %.2fs",
                 self._wal.dir, self._n, count, time.perf_counter() - t0)
        self._after_write()

    def _start_build(self, background: bool) -> None:
        gen = self._generation
        live_ids = self._ids[: self._n].copy()
        first_new = self._next_id
        self._ann_build_deleted = []
        self._ann_status = f"building over {len(live_ids)} entries"
        if background:
            t = threading.Thread(target=self._build, args=(gen, live_ids, first_new), name="inferd-store-ann",
                                 daemon=True)
            self._ann_building = t
            t.start()
        else:
            self._ann_building = threading.current_thread()
            self._build(gen, live_ids, first_new)

    def _build(self, gen: int, live_ids: np.ndarray, first_new: int) -> None:
        """Build an index over ``live_ids`` without holding the lock, then publish it.

        A random sample of entries is held out of the graph and used as calibration
        queries: a query that is itself in the graph is found through its own links,
        which overstated recall (0.99 measured that way, 0.97 on fresh queries).
        """
        try:
            t0 = time.perf_counter()
            cfg = self.config
            rng = np.random.default_rng(12345)
            held_out = rng.choice(live_ids, size=min(CALIBRATION_QUERIES, len(live_ids) // 10), replace=False)
            graph_ids = np.setdiff1d(live_ids, held_out, assume_unique=True)
            index = ann_mod.HnswIndex(self.dim, int(len(live_ids) * 1.25), cfg.ann_m, cfg.ann_ef_construction)
            chunk = 20_000
            for s in range(0, len(graph_ids), chunk):
                with self._lock:
                    if gen != self._generation:
                        return
                    ids = graph_ids[s : s + chunk]
                    rows = self._row_of_id[ids]
                    keep = rows >= 0
                    ids, rows = ids[keep], rows[keep]
                    vecs = self._keys[rows] * self._inv[rows, None]
                index.add(vecs, ids)  # the heavy part, lock released
            build_s = time.perf_counter() - t0
            with self._lock:
                if gen != self._generation:
                    return
                # Catch up with the writes made while building.
                dead = [i for i in self._ann_build_deleted if i < first_new]
                if dead:
                    index.remove(dead)
                new_ids = np.arange(first_new, self._next_id, dtype=np.int64)
                new_rows = self._row_of_id[new_ids] if len(new_ids) else new_ids
                keep = new_rows >= 0
                if keep.any():
                    r = new_rows[keep]
                    index.add(self._keys[r] * self._inv[r, None], new_ids[keep])
                sample_ids = held_out[self._row_of_id[held_out] >= 0]
                sample_rows = self._row_of_id[sample_ids]
                sample = self._keys[sample_rows] * self._inv[sample_rows, None]
                exact_ms = 0.0
                if len(sample):
                    with blas_threads(cfg.scan_threads):
                        self._exact_rows(sample[0], 10)  # warm-up (first use loads threadpoolctl)
                        t0 = time.perf_counter()
                        for q in sample[:5]:
                            self._exact_rows(q, 10)
                        exact_ms = (time.perf_counter() - t0) / min(5, len(sample)) * 1e3
                    # A small margin over the target covers the sampling error of the estimate.
                    target = min(1.0, cfg.ann_recall + 0.005)
                    cal = ann_mod.calibrate(
                        index, sample, lambda q, k: self._exact_topk_ids(q, k, exclude_rows=sample_rows),
                        target, exact_ms, max_speed_ratio=cfg.ann_time_ratio)
                else:
                    cal = ann_mod.Calibration(None, 0.0, 0.0, 0.0, [])
                index.add(sample, sample_ids)
                if cal.ef is None:
                    self._ann, self._ann_ef = None, None
                    self._ann_retry_at = self._n * 2  # data may change character as it grows
                else:
                    index.set_ef(cal.ef)
                    self._ann, self._ann_ef = index, cal.ef
                self._ann_status = f"{cal.describe()} (built over {index.size} in {build_s:.1f}s)"
                log.info("store: %s", self._ann_status)
        except Exception:  # noqa: BLE001 - a failed build must leave the exact scan working
            log.exception("store: ANN build failed; exact scan stays in use")
            with self._lock:
                self._ann_status = "build failed (see log); exact scan in use"
                self._ann_retry_at = self._n * 2
        finally:
            with self._lock:
                if self._ann_building is threading.current_thread():
                    self._ann_building = None


CALIBRATION_QUERIES = 200


class _Blas:
    """Sets OpenBLAS's thread count around a scan (``threadpoolctl``; a no-op without it).

    Why: the exact scan is a memory-bound matrix-vector product. On this 2-core machine
    shared with other work, OpenBLAS's threads made it 2-30x slower than one thread
    (10k x 384: 7-8 ms vs 0.25 ms; 100k: 9-16 ms vs 5-7 ms), because each call waits
    for a descheduled helper thread. Restoring the count after each scan keeps other
    numpy users in the process unaffected.
    """

    def __init__(self) -> None:
        self._lib: Any = None
        self._tried = False

    def _controller(self) -> Any:
        if not self._tried:
            self._tried = True
            try:
                from threadpoolctl import ThreadpoolController

                libs = ThreadpoolController().select(user_api="blas").lib_controllers
                self._lib = libs[0] if libs else None
            except Exception:  # noqa: BLE001 - optional speed-up only
                self._lib = None
        return self._lib

    @contextlib.contextmanager
    def __call__(self, threads: int) -> Iterator[None]:
        lib = self._controller() if threads > 0 else None
        if lib is None:
            yield
            return
        before = lib.get_num_threads()
        lib.set_num_threads(threads)
        try:
            yield
        finally:
            lib.set_num_threads(before)


blas_threads = _Blas()


# Norm bounds: a zero vector has no direction (cosine undefined); outside these bounds the
# float32 matrix-vector product could underflow to 0 or overflow to inf.
MIN_NORM = 1e-30
MAX_NORM = 1e30


def _norms(mat: np.ndarray) -> np.ndarray:
    """Row norms: float32 where that is exact enough, float64 for rows whose squares under/overflow."""
    squares = np.einsum("ij,ij->i", mat, mat)
    suspect = ~((squares > 1e-36) & (squares < 1e36))
    if suspect.any():
        exact = mat[suspect].astype(np.float64)
        squares = squares.astype(np.float64)
        squares[suspect] = np.einsum("ij,ij->i", exact, exact)
    return np.sqrt(squares)


def _check_nonzero(mat: np.ndarray, field: str) -> None:
    norms = _norms(mat)
    bad_rows = (norms < MIN_NORM) | (norms > MAX_NORM)
    if bad_rows.any():
        bad = int(np.flatnonzero(bad_rows)[0])
        name = f"{field}[{bad}]" if field == "Keys" else field
        if norms[bad] < MIN_NORM:
            raise StoreInputError("zero vector: cosine similarity is undefined", name)
        raise StoreInputError(f"vector norm {norms[bad]:.3g} is above {MAX_NORM:g}", name)


def _last_wins(mat: np.ndarray, vals: list[bytes]) -> tuple[np.ndarray, list[bytes]]:
    """Drop earlier repeats of a key within one batch (the last value wins, like sequential Sets)."""
    if len(vals) < 2:
        return mat, vals
    view = np.ascontiguousarray(mat).view(np.dtype((np.void, mat.dtype.itemsize * mat.shape[1]))).ravel()
    rev_unique, rev_index = np.unique(view[::-1], return_index=True)
    if len(rev_unique) == len(vals):
        return mat, vals
    keep = np.sort(len(vals) - 1 - rev_index)
    return mat[keep], [vals[i] for i in keep.tolist()]


__all__ = ["FindResult", "StoreConfig", "StoreInputError", "VectorStore"]
