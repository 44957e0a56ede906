"""The approximate index used above a size threshold: HNSW from ``hnswlib``.

Why hnswlib and not usearch: measured on this machine (2 shared cores, 100k x 384,
M=16), hnswlib built the graph 2.7x faster (76 s vs 205 s) and answered 4x faster at the
same ef with the same recall; see docs/local-store.md for the numbers.

The index stores L2-normalised copies of the keys under the inner-product metric
(cosine). Labels are the store's stable entry ids, not row numbers, because the store
compacts rows on delete. Deleted entries are ``mark_deleted``: hnswlib keeps them as
graph waypoints but never returns them, so a Find never sees a deleted key.

HNSW recall depends on the data: on clustered, embedding-like data a modest ``ef``
reaches 0.98 recall@10, on uniformly random vectors it needs an ``ef`` so large the scan
is cheaper. So the store calibrates ``ef`` on its own data (see ``calibrate``) and
keeps the exact scan when no ``ef`` reaches the target fast enough.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def available() -> bool:
    try:
        import hnswlib  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Calibration:
    """Outcome of ``calibrate``: the ef to use, or None when ANN does not pay off."""

    ef: int | None
    recall: float
    ann_ms: float
    exact_ms: float
    tried: list[tuple[int, float, float]]  # (ef, recall, ms)

    def describe(self) -> str:
        if self.ef is None:
            best = max(self.tried, key=lambda t: t[1]) if self.tried else (0, 0.0, 0.0)
            return (f"exact scan kept: best ANN recall@10 {best[1]:.3f} at ef={best[0]} "
                    f"({best[2]:.2f} ms vs exact {self.exact_ms:.2f} ms)")
        return f"ANN ef={self.ef}: recall@10 {self.recall:.3f}, {self.ann_ms:.2f} ms vs exact {self.exact_ms:.2f} ms"


class HnswIndex:
    """A growable HNSW index over unit vectors labelled by entry id."""

    def __init__(self, dim: int, capacity: int, m: int = 16, ef_construction: int = 100) -> None:
        import hnswlib

        self.dim = dim
        self._index = hnswlib.Index(space="ip", dim=dim)
        self._index.init_index(max_elements=max(capacity, 1024), M=m, ef_construction=ef_construction,
                               allow_replace_deleted=False)
        self.ef = 64
        self._index.set_ef(self.ef)
        self.size = 0  # labels added (live + deleted)
        self.deleted = 0

    def add(self, unit_vectors: np.ndarray, ids: np.ndarray, threads: int = 1) -> None:
        """Insert vectors; ``threads=1`` runs in the calling thread (so its priority applies)."""
        if len(ids) == 0:
            return
        need = self.size + len(ids)
        cap = self._index.get_max_elements()
        if need > cap:
            self._index.resize_index(max(need, int(cap * 1.5)))
        self._index.add_items(unit_vectors, ids, num_threads=threads)
        self.size += len(ids)

    def remove(self, ids: np.ndarray | list[int]) -> None:
        for i in ids:
            try:
                self._index.mark_deleted(int(i))
            except RuntimeError:  # never added (deleted before a background build copied it)
                continue
            self.deleted += 1

    @property
    def live(self) -> int:
        return self.size - self.deleted

    def set_ef(self, ef: int) -> None:
        self.ef = ef
        self._index.set_ef(ef)

    def search(self, unit_query: np.ndarray, k: int, ef: int | None = None) -> np.ndarray:
        """Ids of (about) the ``k`` most similar live entries."""
        if ef is not None and ef != self.ef:
            self.set_ef(ef)
        labels, _ = self._index.knn_query(unit_query.reshape(1, -1), k=k)
        return labels[0].astype(np.int64)

    def search_batch(self, unit_queries: np.ndarray, k: int) -> np.ndarray:
        labels, _ = self._index.knn_query(unit_queries, k=k, num_threads=1)
        return labels.astype(np.int64)

    def nbytes(self) -> int:
        # vectors + level-0 links (2*M int32) + label; upper levels are small.
        return self.size * (self.dim * 4 + 2 * self._index.M * 4 + 16)


def recall_at(index: HnswIndex, queries: np.ndarray, truth: list[set[int]], ef: int,
              k: int = 10) -> tuple[float, float]:
    """(recall@k, ms per query) of ``index`` at ``ef`` against exact ``truth`` id sets.

    The time is this thread's CPU time (the batch is searched in the calling thread):
    the index builder runs at a low priority, and wall-clock time would count every
    preemption by other work as search time.
    """
    index.set_ef(ef)
    t0 = time.thread_time()
    # One call for all queries: hnswlib releases the GIL for the whole batch. A niced
    # builder thread that holds the GIL when it is preempted stalls every Find until it
    # runs again (priority inversion), so the builder takes the GIL as rarely as it can.
    found = index.search_batch(queries, k)
    ms = (time.thread_time() - t0) / max(len(queries), 1) * 1e3
    hits = sum(len(set(row.tolist()) & want) for row, want in zip(found, truth, strict=True))
    return hits / max(sum(len(w) for w in truth), 1), ms


@dataclass
class Probe:
    """Outcome of ``probe``: the smallest ef reaching the target at two sample sizes, and
    the ef a full index of ``n`` entries would then need (None: unreachable)."""

    sizes: tuple[int, int]
    efs: tuple[int | None, int | None]
    ms: float  # query time at the larger sample's ef
    predicted_ef: float | None
    seconds: float

    def describe(self) -> str:
        shown = ", ".join(f"{m} entries: {'>' + str(PROBE_EFS[-1]) if ef is None else ef}"
                          for m, ef in zip(self.sizes, self.efs, strict=True))
        pred = "unreachable" if self.predicted_ef is None else f"{self.predicted_ef:.0f}"
        return f"sample ef for the target recall ({shown}); predicted at full size: {pred}"


PROBE_EFS = (16, 32, 64, 128, 256, 512, 1024)


def probe(sample: np.ndarray, n: int, target: float, m: int, ef_construction: int,
          threads: int = 1, queries: int = 100) -> Probe:
    """Predict, from a sample of the store's unit vectors, the ``ef`` a full index would need.

    Why: on data an HNSW graph cannot search well (uniformly random vectors are the worst
    case) the ef needed for a given recall grows about in proportion to the entries
    (measured, 384-d random: 256 at 2.5k, 512 at 5k, 1024 at 10k), while on clustered,
    embedding-like data it stays flat (16-32 from 2.5k to 20k). Building small indexes
    over a quarter of the sample and over all of it, and finding the smallest passing ef
    on held-out sample queries for each, gives that growth; extrapolated to ``n`` it tells
    whether a full build (minutes at 100k+ on 2 cores) can pay off, in seconds.
    """
    t0 = time.perf_counter()
    held, graph = sample[:queries], sample[queries:]
    sizes = (max(len(graph) // 4, 1), len(graph))
    efs: list[int | None] = []
    ms = 0.0
    for size in sizes:
        part = graph[:size]
        index = HnswIndex(sample.shape[1], size, m, ef_construction)
        index.add(part, np.arange(size, dtype=np.int64), threads)
        sims = held @ part.T
        k = min(10, size)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        truth = [set(row.tolist()) for row in top]
        found = None
        for ef in PROBE_EFS:
            recall, ms = recall_at(index, held, truth, ef, k)
            if recall >= target:
                found = ef
                break
        efs.append(found)
    predicted: float | None = None
    if efs[0] is not None and efs[1] is not None:
        growth = np.log(efs[1] / efs[0]) / np.log(sizes[1] / sizes[0])
        predicted = efs[1] * (max(n, sizes[1]) / sizes[1]) ** max(growth, 0.0)
    return Probe(sizes, (efs[0], efs[1]), ms, predicted, time.perf_counter() - t0)


def calibrate(
    index: HnswIndex,
    queries: np.ndarray,
    exact_topk: Callable[[np.ndarray, int], np.ndarray],
    target: float,
    exact_ms: float,
    efs: tuple[int, ...] = (32, 64, 128, 256, 512, 1024),
    max_speed_ratio: float = 0.5,
) -> Calibration:
    """Pick the smallest ``ef`` whose recall@10 reaches ``target`` on this store's data.

    ``queries`` are stored entries held out of the graph (in-distribution, and not
    findable through their own links); ``exact_topk(queries, k)`` returns the exact
    top-k ids among the entries that are in the graph. ANN is used only if it also takes
    at most ``max_speed_ratio`` of ``exact_ms`` (one exact single-query scan), otherwise
    the exact scan is kept.
    """
    k = 10
    truth = [set(row.tolist()) for row in exact_topk(queries, k)]
    tried: list[tuple[int, float, float]] = []

    def measure(ef: int) -> tuple[float, float]:
        recall, ann_ms = recall_at(index, queries, truth, ef, k)
        tried.append((ef, recall, ann_ms))
        return recall, ann_ms

    for ef in efs:
        recall, ann_ms = measure(ef)
        if ann_ms > exact_ms * max_speed_ratio:
            break
        if recall >= target:
            # Safety factor: the smallest passing ef sat at the edge on fresh queries
            # (0.987 on the held-out sample, 0.971 on other queries, 100k x 384), and
            # doubling it costs little next to a scan.
            recall2, ann_ms2 = measure(ef * 2)
            if ann_ms2 <= exact_ms * max_speed_ratio and recall2 >= recall:
                return Calibration(ef * 2, recall2, ann_ms2, exact_ms, tried)
            return Calibration(ef, recall, ann_ms, exact_ms, tried)
    return Calibration(None, max((t[1] for t in tried), default=0.0), tried[-1][2] if tried else 0.0, exact_ms, tried)
