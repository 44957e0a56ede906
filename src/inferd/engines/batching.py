"""Dynamic batching shared by the engines: concurrent requests share one forward pass.

Why: a transformer forward over 16 inputs costs far less than 16 forwards of one (the
weights are read once, the matrix products are wider), so under concurrent load a
batched engine answers more requests per second (bench/embeddings.py, bench/rerank.py).
Callers submit their items (texts for the sentence encoder, (query, document) pairs for
the cross-encoder); a worker thread takes the first waiting job, collects more for at
most ``window_s`` (or until ``max_batch`` items), runs them as one ``run`` call and routes
each caller its rows. ``workers > 1`` runs several such loops on one model (its ``run``
must then be thread-safe, as onnxruntime's ``InferenceSession.run`` is).

The batcher does not know what a row is: ``concat`` joins the results of the slices of a
batch and ``take`` cuts one caller's rows out of it, so each engine keeps its own result
type (``Encoded`` vectors, cross-encoder ``Scored`` logits).

``max_batch`` smaller than the number of callers in flight is deliberate: while one batch
computes, the replies of the previous one travel back and new requests arrive, so the
engine and the RPC work overlap instead of taking turns (measured for the embeddings:
max_batch 8 gave ~1.2x the throughput of 32 at 16 callers in flight on 2 cores).

A job may bring more items than ``max_batch`` (a rerank of 100 documents): the batch is
run in ``max_batch`` slices so memory stays bounded. With ``order_key`` the items of a
batch are first sorted by that key (e.g. their length) so each slice holds inputs of
similar length and pads less; the results are put back in the callers' order.

The window is adaptive: it is only waited for when the previous batch had more than one
job, i.e. when there is concurrent traffic to wait for. A lone sequential caller never
pays the window as extra latency.

Jobs whose caller went away (their future was cancelled before the batch started) are
dropped from the batch; a cancel after the batch started discards that caller's rows, and
a batch whose callers have all gone stops before its next slice, as does any batch once
``close`` (an unload) was called: a 4,000-document rerank does not hold Free for minutes.
The other callers of a batch get their results.
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
from typing import Any, Generic, TypeVar

from inferd.errors import Cancelled, FailedPrecondition

log = logging.getLogger("inferd.engines.batching")

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Job(Generic[Item]):
    items: list[Item]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class BatcherStats:
    """Counters for tests and benchmarks (updated under a lock, read without one)."""

    batches: int = 0
    jobs: int = 0
    texts: int = 0  # items run (texts or pairs); the name predates pairs
    largest_batch_jobs: int = 0
    dropped_cancelled: int = 0


class DynamicBatcher(Generic[Item, Result]):
    """Collects concurrent requests into batches run by worker threads (see the module doc)."""

    def __init__(
        self,
        run: Callable[[Sequence[Item]], Result],
        *,
        concat: Callable[[list[Result]], Result],
        take: Callable[[Result, Sequence[int]], Result],
        max_batch: int = 32,
        window_s: float = 0.003,
        workers: int = 1,
        order_key: Callable[[Item], Any] | None = None,
        name: str = "inferd-batcher",
        closed_message: str = "the model was unloaded",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if window_s < 0:
            raise ValueError("window_s must be >= 0")
        self._run_fn = run
        self._concat = concat
        self._take = take
        self._order_key = order_key
        self._closed_message = closed_message
        self.max_batch = max_batch
        self.window_s = window_s
        self.stats = BatcherStats()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # ---- callers -------------------------------------------------------------------
    def submit(self, items: Sequence[Item]) -> concurrent.futures.Future:
        """Queue ``items``; the future resolves to the ``Result`` for exactly these items."""
        job: _Job[Item] = _Job(list(items))
        with self._close_lock:
            if self._closed:
                raise FailedPrecondition(self._closed_message)
            self._queue.put(job)
        return job.future

    async def process(self, items: Sequence[Item]) -> Result:
        """Awaitable ``submit``: only awaits, so it is safe on the event loop.

        Cancelling the awaiting task cancels the job if it has not started; if it has, the
        job is marked abandoned, and a batch whose jobs are all abandoned stops before its
        next ``max_batch`` slice.
        """
        future = self.submit(items)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.abandoned = True  # type: ignore[attr-defined]
            raise

    def process_sync(self, items: Sequence[Item]) -> Result:
        return self.submit(items).result()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers after the batch in progress; fail jobs still queued."""
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
                job.future.set_exception(FailedPrecondition(self._closed_message))

    # ---- the worker ------------------------------------------------------------------
    def _collect(self, first: _Job, wait: bool) -> tuple[list[_Job], bool]:
        """Gather jobs after ``first`` until the window closes or the batch is full."""
        jobs = [first]
        n = len(first.items)
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
            n += len(job.items)
        return jobs, False

    def _loop(self) -> None:
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

    def _check_still_wanted(self, jobs: list[_Job]) -> None:
        if self._closed:
            raise FailedPrecondition(self._closed_message)
        if all(getattr(j.future, "abandoned", False) for j in jobs):
            raise Cancelled("every caller of this batch went away")

    def _run_batch(self, jobs: list[_Job]) -> None:
        items = [it for j in jobs for it in j.items]
        order = list(range(len(items)))
        if self._order_key is not None and len(items) > self.max_batch:
            key = self._order_key
            order.sort(key=lambda i: key(items[i]))
        try:
            parts = []
            for start in range(0, len(items), self.max_batch):
                if start:  # between slices: stop for an unload, or when every caller left
                    self._check_still_wanted(jobs)
                parts.append(self._run_fn([items[i] for i in order[start : start + self.max_batch]]))
            merged = parts[0] if len(parts) == 1 else self._concat(parts)
        except BaseException as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for j in jobs:
                j.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.jobs += len(jobs)
            self.stats.texts += len(items)
            self.stats.largest_batch_jobs = max(self.stats.largest_batch_jobs, len(jobs))
        # position[i] = row of item i in ``merged`` (identity unless the batch was sorted)
        position = [0] * len(items)
        for row, i in enumerate(order):
            position[i] = row
        start = 0
        for j in jobs:
            n = len(j.items)
            j.future.set_result(self._take(merged, position[start : start + n]))
            start += n
