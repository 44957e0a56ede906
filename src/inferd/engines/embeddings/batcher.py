"""Dynamic batching: concurrent requests share one forward pass.

Why: a transformer forward over 16 sentences costs far less than 16 forwards of one
(the weights are read once, the matrix products are wider), so under concurrent load
the batched engine answers more requests per second (see bench/embeddings.py and
docs/embeddings.md). Callers submit their texts; a worker thread takes the first waiting
job, collects more for at most ``window_s`` (or until ``max_batch`` texts), runs them as
one ``encode`` call and routes each caller its rows. ``workers > 1`` runs several such
loops on one encoder (its ``encode`` must then be thread-safe, as onnxruntime's is).

``max_batch`` smaller than the number of callers in flight is deliberate: while one batch
computes, the replies of the previous one travel back and new requests arrive, so the
engine and the RPC work overlap instead of taking turns (measured: max_batch 8 gave
~1.2x the throughput of 32 at 16 callers in flight on 2 cores).

The window is adaptive: it is only waited for when the previous batch had more than
one job, i.e. when there is concurrent traffic to wait for. A lone sequential caller
therefore never pays the window as extra latency.

Jobs whose caller went away (their future was cancelled before the batch started) are
dropped from the batch; a cancel after the batch started just discards that caller's
rows. Either way the other callers of the batch get their results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from inferd.engines.embeddings.encoder import Encoded
from inferd.errors import FailedPrecondition

log = logging.getLogger("inferd.engines.embeddings.batcher")


@dataclass
class _Job:
    texts: list[str]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class BatcherStats:
    """Counters for tests and benchmarks (updated under a lock, read without one)."""

    batches: int = 0
    jobs: int = 0
    texts: int = 0
    largest_batch_jobs: int = 0
    dropped_cancelled: int = 0


class DynamicBatcher:
    """Collects concurrent ``encode`` requests into batches run by one worker thread."""

    def __init__(
        self,
        encode: Callable[[Sequence[str]], Encoded],
        *,
        max_batch: int = 32,
        window_s: float = 0.003,
        workers: int = 1,
        name: str = "inferd-embed-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if window_s < 0:
            raise ValueError("window_s must be >= 0")
        self._encode = encode
        self.max_batch = max_batch
        self.window_s = window_s
        self.stats = BatcherStats()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # ---- callers -------------------------------------------------------------------
    def submit(self, texts: Sequence[str]) -> concurrent.futures.Future:
        """Queue ``texts``; the future resolves to an ``Encoded`` for exactly these texts."""
        job = _Job(list(texts))
        with self._close_lock:
            if self._closed:
                raise FailedPrecondition("the embedding model was unloaded")
            self._queue.put(job)
        return job.future

    async def encode(self, texts: Sequence[str]) -> Encoded:
        """Awaitable ``submit``: only awaits, so it is safe on the event loop.

        Cancelling the awaiting task cancels the job if it has not started.
        """
        return await asyncio.wrap_future(self.submit(texts))

    def encode_sync(self, texts: Sequence[str]) -> Encoded:
        return self.submit(texts).result()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker after the batch in progress; fail jobs still queued."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(FailedPrecondition("the embedding model was unloaded"))

    # ---- the worker ------------------------------------------------------------------
    def _collect(self, first: _Job, wait: bool) -> tuple[list[_Job], bool]:
        """Gather jobs after ``first`` until the window closes or the batch is full."""
        jobs = [first]
        n = len(first.texts)
        deadline = time.monotonic() + (self.window_s if wait else 0.0)
        while n < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None:  # this worker's stop marker: finish this batch, then stop
                return jobs, True
            jobs.append(job)
            n += len(job.texts)
        return jobs, False

    def _run(self) -> None:
        last_jobs = 1
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._collect(first, wait=last_jobs > 1)
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            with self._stats_lock:
                self.stats.dropped_cancelled += len(jobs) - len(live)
            last_jobs = len(jobs)
            if not live:
                continue
            self._run_batch(live)

    def _run_batch(self, jobs: list[_Job]) -> None:
        texts = [t for j in jobs for t in j.texts]
        try:
            vectors: list[np.ndarray] = []
            counts: list[int] = []
            # A job may bring more texts than max_batch (a rerank of many documents):
            # run the batch in max_batch slices so memory stays bounded.
            for start in range(0, len(texts), self.max_batch):
                out = self._encode(texts[start : start + self.max_batch])
                vectors.append(out.vectors)
                counts.extend(out.token_counts)
            matrix = np.concatenate(vectors, axis=0) if len(vectors) > 1 else vectors[0]
        except BaseException as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for j in jobs:
                j.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.jobs += len(jobs)
            self.stats.texts += len(texts)
            self.stats.largest_batch_jobs = max(self.stats.largest_batch_jobs, len(jobs))
        row = 0
        for j in jobs:
            n = len(j.texts)
            j.future.set_result(Encoded(matrix[row : row + n], counts[row : row + n]))
            row += n
