"""When the ANN index is built, how, and when it is used.

Above ``ann_threshold`` entries an HNSW index (``ann``) is built in a background thread,
then kept up to date on every Set/Delete, and answers Find once its calibrated
recall@10 reaches ``ann_recall`` at a fraction of an exact scan's time.

The build must not slow the Finds it is meant to speed up. Measured before this module
(100k x 384, 2 cores): Find p50 12.6 ms during the build against 5.7-6.7 ms after it,
because hnswlib used every core and the calibration ran under the store's lock. So:

* the builder runs at a low CPU priority (``ann_build_nice``, default 19: on Linux
  ``setpriority`` on a thread id affects that thread alone) with ``ann_build_threads``
  (default 1) hnswlib threads: Finds keep their core, and the build takes whatever is
  idle. The price: on a busy machine the build takes longer (it only gets idle time);
  on a machine with idle cores it costs nothing but the parallelism given up;
* the store's lock is held only to copy chunks of rows, for a few exact timing scans and
  to publish; the index is built, and its recall measured, outside the lock;
* on data where the index cannot reach its recall (uniformly random vectors are the
  worst case) the decision comes EARLY: ``ann.probe`` builds two small indexes over a
  sample (a few seconds) and extrapolates the ``ef`` a full index would need; if that is
  unreachable or predicted slower than ``ann_time_ratio`` x an exact scan, the full build
  (minutes) is skipped. The probe is repeated when the store has doubled.

Writes made during a build are caught up when it is published; a ``generation`` counter
bumped on clear/close makes a stale builder give up without publishing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from inferd.engines.store import ann, similarity

log = logging.getLogger("inferd.store")

#: Entries held out of the graph as calibration queries (in-distribution, not findable
#: through their own links: a query that is in the graph overstated recall, 0.99 vs 0.97).
CALIBRATION_QUERIES = 200
#: Rows copied per lock hold, and indexed between two checks for abandonment. Small: a niced
#: builder preempted while it holds the store's lock (or the GIL) stalls every Find, so it
#: only copies raw rows under the lock and converts them after releasing it.
_CHUNK = 2_000
#: Writes made during a build that are caught up under the lock, at publication (an HNSW
#: insert takes ~0.2-1 ms at 384-d: a few hundred keep that pause short).
_FINAL_CATCH_UP = 256


def lower_thread_priority(nice: int) -> None:
    """Raise this thread's nice value to ``nice`` (Linux: per thread; threads it starts inherit it)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:  # not permitted (a sandbox): the build just runs at normal priority
        log.debug("store: could not lower the index builder's priority: %s", exc)


class AnnLifecycle:
    """The index, its builder thread and its status. Methods not marked otherwise are called
    with the store's lock held; ``table`` is the store's ``KeyTable``."""

    def __init__(self, config: Any, lock: threading.RLock, table: Any,
                 exact_rows: Callable[[np.ndarray, int], Any]) -> None:
        self.config = config
        self._lock = lock
        self._table = table
        self._exact_rows = exact_rows  # (float64 unit query, k) -> the exact path's answer
        self.enabled = config.ann != "off" and ann.available()
        self.index: ann.HnswIndex | None = None
        self.ef: int | None = None
        if config.ann == "off":
            self.status = "off"
        elif not self.enabled:
            self.status = "unavailable (hnswlib is not installed): exact scan only"
        else:
            self.status = "not built (below threshold)"
        self._thread: threading.Thread | None = None
        self._deleted_during_build: list[int] = []
        self._retry_at = config.ann_threshold
        self._generation = 0

    # ---- keeping up with writes --------------------------------------------------------
    def on_added(self, start: int, end: int) -> None:
        if self.index is not None and end > start:
            rows = np.arange(start, end)
            self.index.add(self._table.unit32(rows), self._table.ids[start:end].copy())

    def on_removed(self, ids: list[int]) -> None:
        if not ids:
            return
        if self.index is not None:
            self.index.remove(ids)
        if self._thread is not None:
            self._deleted_during_build.extend(ids)

    def on_cleared(self) -> None:
        """The store became empty: drop the index, abandon a build, start over."""
        self.index, self.ef = None, None
        self._generation += 1
        self._retry_at = self.config.ann_threshold
        if self.enabled:
            self.status = "not built (below threshold)"

    def after_write(self) -> None:
        if (self.enabled and self.index is None and self._thread is None
                and self._table.n >= max(self.config.ann_threshold, self._retry_at)):
            self.start(background=self.config.ann_background)

    # ---- answering -----------------------------------------------------------------------
    def usable(self, k: int) -> bool:
        if self.ef is None or self.index is None:
            return False
        return k <= self.config.ann_max_topk and k * 4 <= self.index.live

    def rows(self, unit32: np.ndarray, k: int) -> np.ndarray | None:
        """Rows of about the ``k`` nearest entries, or None (then the exact scan answers)."""
        assert self.index is not None and self.ef is not None
        try:
            ids = self.index.search(unit32, k, ef=max(self.ef, k))
        except RuntimeError:  # hnswlib: fewer than k reachable live entries
            return None
        rows = self._table.row_of_id[ids]
        if (rows < 0).any():  # cannot happen (deletes are marked), but never return a ghost
            return None
        return rows

    # ---- the builder ---------------------------------------------------------------------
    def start(self, background: bool) -> None:
        gen = self._generation
        self._deleted_during_build = []
        self.status = f"building over {self._table.n} entries"
        if background:
            t = threading.Thread(target=self._build, args=(gen, True), name="inferd-store-ann", daemon=True)
            self._thread = t
            t.start()
        else:
            self._thread = threading.current_thread()
            self._build(gen, False)

    def abandon(self) -> threading.Thread | None:
        """Make a running build give up; returns its thread (join it WITHOUT the lock)."""
        self._generation += 1
        self.index, self.ef = None, None
        return self._thread

    def running(self) -> threading.Thread | None:
        return self._thread

    def _stale(self, gen: int) -> bool:
        return gen != self._generation

    def _build(self, gen: int, background: bool) -> None:
        """Probe, build, calibrate and publish; see the module docstring. Lock taken in steps."""
        try:
            if background:
                lower_thread_priority(self.config.ann_build_nice)
            self._build_steps(gen)
        except Exception:  # noqa: BLE001 - a failed build must leave the exact scan working
            log.exception("store: ANN build failed; exact scan stays in use")
            with self._lock:
                if not self._stale(gen):
                    self.status = "build failed (see log); exact scan in use"
                    self._retry_at = self._table.n * 2
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _build_steps(self, gen: int) -> None:
        cfg, table = self.config, self._table
        target = min(1.0, cfg.ann_recall + 0.005)  # a margin for the estimate's sampling error
        rng = np.random.default_rng(12345)
        with self._lock:
            if self._stale(gen):
                return
            live = table.ids[: table.n].copy()
            first_new = table.next_id
            dim = table.dim
        t0 = time.perf_counter()
        if cfg.ann_probe_size > 0 and len(live) > 2 * cfg.ann_probe_size:
            if not self._probe_says_build(gen, rng.choice(live, cfg.ann_probe_size + 100, replace=False), target):
                return
        held_ids = rng.choice(live, size=min(CALIBRATION_QUERIES, len(live) // 10), replace=False)
        graph_ids = np.setdiff1d(live, held_ids, assume_unique=True)
        index = ann.HnswIndex(dim, int(len(live) * 1.25), cfg.ann_m, cfg.ann_ef_construction)
        for s in range(0, len(graph_ids), _CHUNK):
            ids, vecs = self._copy_live(gen, graph_ids[s : s + _CHUNK])
            if ids is None:
                return
            index.add(vecs, ids, cfg.ann_build_threads)  # the heavy part, lock released
        build_s = time.perf_counter() - t0
        held_ids, held = self._copy_live(gen, held_ids)
        if held_ids is None:
            return
        if len(held):
            # Calibrate against what the graph holds: entries deleted since are marked now,
            # entries written since (not in the graph until the catch-up) are left out of the truth.
            with self._lock:
                index.remove(list(self._deleted_during_build))
            truth = self._exact_truth(gen, held, held_ids, first_new)
            if truth is None:
                return
            exact_ms = self._time_exact(gen, held[:5])
            cal = ann.calibrate(index, held, lambda _q, _k: truth, target, exact_ms,
                                max_speed_ratio=cfg.ann_time_ratio)
        else:
            cal = ann.Calibration(None, 0.0, 0.0, 0.0, [])
        self._catch_up_and_publish(gen, index, first_new, held_ids, cal, build_s)

    def _catch_up_and_publish(self, gen: int, index: ann.HnswIndex, first_new: int, held_ids: np.ndarray,
                              cal: ann.Calibration, build_s: float) -> None:
        """Add the entries written during the build (in chunks outside the lock while many are
        left, the last chunk under it), mark the ones deleted meanwhile, then publish."""
        table = self._table
        caught = first_new
        while True:
            with self._lock:
                if self._stale(gen):
                    return
                end = table.next_id
                if end - caught <= _FINAL_CATCH_UP:
                    for ids in (np.arange(caught, end, dtype=np.int64), held_ids):
                        rows = table.row_of_id[ids] if len(ids) else ids
                        keep = rows >= 0
                        if keep.any():
                            index.add(table.unit32(rows[keep]), ids[keep])
                    index.remove(self._deleted_during_build)  # ids never added are skipped
                    if cal.ef is None:
                        self.index, self.ef = None, None
                        self._retry_at = table.n * 2  # data may change character as it grows
                    else:
                        index.set_ef(cal.ef)
                        self.index, self.ef = index, cal.ef
                    self.status = f"{cal.describe()} (built over {index.size} in {build_s:.1f}s)"
                    log.info("store: %s", self.status)
                    return
            upto = min(end, caught + _CHUNK)
            ids, vecs = self._copy_live(gen, np.arange(caught, upto, dtype=np.int64))
            if ids is None:
                return
            index.add(vecs, ids, self.config.ann_build_threads)
            caught = upto

    def _probe_says_build(self, gen: int, sample_ids: np.ndarray, target: float) -> bool:
        cfg = self.config
        ids, sample = self._copy_live(gen, sample_ids)
        if ids is None:
            return False
        n = self._table.n
        p = ann.probe(sample, n, target, cfg.ann_m, cfg.ann_ef_construction, cfg.ann_build_threads)
        exact_ms = self._time_exact(gen, sample[:5])
        predicted_ms = float("inf") if p.predicted_ef is None or p.efs[1] is None else p.ms * p.predicted_ef / p.efs[1]
        if p.predicted_ef is not None and p.predicted_ef <= ann.PROBE_EFS[-1] * 2 \
                and predicted_ms <= cfg.ann_time_ratio * exact_ms:
            log.info("store: ANN probe in %.1fs: %s; building", p.seconds, p.describe())
            return True
        with self._lock:
            if not self._stale(gen):
                self.status = (f"exact scan kept, full index not built: {p.describe()}; predicted ANN "
                               f"{predicted_ms:.2f} ms vs exact {exact_ms:.2f} ms (probe {p.seconds:.1f}s)")
                self._retry_at = self._table.n * 2
                log.info("store: %s", self.status)
        return False

    def _copy_live(self, gen: int, ids: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """The still-live ``ids`` and their float32 unit vectors (None if the build is stale)."""
        with self._lock:
            if self._stale(gen):
                return None, np.empty(0)
            rows = self._table.row_of_id[ids]
            keep = rows >= 0
            keys, norms = self._table.keys[rows[keep]], self._table.norms[rows[keep]]  # copies
        return ids[keep], similarity.unit(keys, norms).astype(np.float32)

    def _time_exact(self, gen: int, queries: np.ndarray) -> float:
        """ms per exact Find (the path the index competes with), measured under the lock, in
        this thread's CPU time like the index's (``ann.recall_at``): fair although niced."""
        if not len(queries):
            return 0.0
        with self._lock:
            if self._stale(gen):
                return 0.0
            self._exact_rows(queries[0].astype(np.float64), 10)  # warm-up
            t0 = time.thread_time()
            for q in queries:
                self._exact_rows(q.astype(np.float64), 10)
            return (time.thread_time() - t0) / len(queries) * 1e3

    def _exact_truth(self, gen: int, held: np.ndarray, held_ids: np.ndarray, first_new: int,
                     k: int = 10) -> np.ndarray | None:
        """Exact top-k ids of the held-out queries among the graph's entries (ids below
        ``first_new``, held-out ones excluded), computed chunk by chunk so the lock is held
        only to copy rows (rows moved by a concurrent delete may be seen twice or missed: a
        negligible error in a recall estimate)."""
        best_sims = np.full((len(held), k), -np.inf, dtype=np.float32)
        best_ids = np.full((len(held), k), -1, dtype=np.int64)
        start = 0
        while True:
            with self._lock:
                if self._stale(gen):
                    return None
                t = self._table
                end = min(t.n, start + _CHUNK)
                if start >= end:
                    break
                chunk, inv = t.keys[start:end].copy(), t.inv32[start:end].copy()
                ids = t.ids[start:end].copy()
            chunk *= inv[:, None]
            sims = held @ chunk.T
            sims[:, np.isin(ids, held_ids) | (ids >= first_new)] = -np.inf
            all_sims = np.concatenate([best_sims, sims], axis=1)
            all_ids = np.concatenate([best_ids, np.broadcast_to(ids, sims.shape)], axis=1)
            top = np.argpartition(-all_sims, k - 1, axis=1)[:, :k]
            best_sims = np.take_along_axis(all_sims, top, axis=1)
            best_ids = np.take_along_axis(all_ids, top, axis=1)
            start = end
        return best_ids


__all__ = ["CALIBRATION_QUERIES", "AnnLifecycle", "lower_thread_priority"]
