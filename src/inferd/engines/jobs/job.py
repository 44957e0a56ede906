"""One long-running job's state: a status word, a merged progress snapshot, and its watchers.

Why a snapshot and a history: a progress update (``loss``, ``current_step``...) only carries
what changed, but a watcher that attaches late must see the whole picture at once. So every
event is merged into ``snapshot`` and the merged dict is what watchers receive. A short
history (sequence-numbered) lets several watchers read the same updates at their own pace
from the point they attached; a watcher that falls more than ``HISTORY`` updates behind
skips to the oldest one kept, never blocks the job.

The job's events come from a reader thread (the child process's pipe), watchers are asyncio
tasks on the server's loop (``watch``) or plain threads (``wait``): publishing wakes both.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

# The status words of the proto comments (QuantizationProgressUpdate / FineTuneProgressUpdate).
QUEUED = "queued"
COMPLETED = "completed"
FAILED = "failed"
STOPPED = "stopped"
TERMINAL = frozenset({COMPLETED, FAILED, STOPPED})
#: Running statuses each kind may report between queued and the end.
RUNNING_STATUSES = {
    "quantize": ("converting", "quantizing"),
    "finetune": ("loading_model", "loading_dataset", "training", "saving"),
}

HISTORY = 256


class Job:
    """A job's identity, status and progress; thread-safe."""

    def __init__(self, job_id: str, kind: str, params: dict[str, Any], log_path: Path,
                 cleanup: list[Path] | None = None) -> None:
        self.id = job_id
        self.kind = kind
        self.params = params
        self.log_path = log_path
        #: Files removed when the job does not complete (a partial output).
        self.cleanup = list(cleanup or [])
        self.created = time.time()
        self.started: float | None = None
        self.ended: float | None = None
        self.pid: int | None = None
        self.stop_requested = False
        self.result: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._seq = 0
        self._history: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(maxlen=HISTORY)
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.snapshot: dict[str, Any] = {"job_id": job_id, "status": QUEUED, "message": "queued",
                                         "progress_percent": 0.0}
        self._history.append((0, dict(self.snapshot)))

    # ---- reading -------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return str(self.snapshot["status"])

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ended; True if it did within ``timeout``."""
        return self._done.wait(timeout)

    def updates_since(self, seq: int) -> tuple[int, list[dict[str, Any]]]:
        """Updates after sequence number ``seq`` (all kept ones if it fell behind)."""
        with self._lock:
            out = [dict(u) for s, u in self._history if s > seq]
            return self._seq, out

    async def watch(self) -> AsyncIterator[dict[str, Any]]:
        """Yield the current snapshot, then every update until (and including) the last one."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        waiter = (loop, wake)
        with self._lock:
            self._waiters.add(waiter)
            seq = self._seq
            current = dict(self.snapshot)
        try:
            yield current
            if current["status"] in TERMINAL:
                return
            while True:
                seq, updates = self.updates_since(seq)
                for update in updates:
                    yield update
                    if update["status"] in TERMINAL:
                        return
                await wake.wait()
                wake.clear()
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    # ---- writing (the runner's reader thread) ----------------------------------------------
    def publish(self, event: dict[str, Any]) -> None:
        """Merge ``event`` into the snapshot and wake every watcher."""
        with self._lock:
            if self.status in TERMINAL:
                return  # the end is final; late events (a dying child) are dropped
            metrics = event.pop("extra_metrics", None)
            self.snapshot.update(event)
            if metrics:
                self.snapshot["extra_metrics"] = {**self.snapshot.get("extra_metrics", {}), **metrics}
            self._seq += 1
            self._history.append((self._seq, dict(self.snapshot)))
            if self.snapshot["status"] in TERMINAL:
                self.ended = time.time()
                self._done.set()
            waiters = list(self._waiters)
        for loop, wake in waiters:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # that watcher's loop has closed
                pass

    def describe(self) -> dict[str, Any]:
        """A summary for Status/GetMetrics and logs."""
        return {"job_id": self.id, "kind": self.kind, "status": self.status, "pid": self.pid,
                "progress_percent": self.snapshot.get("progress_percent", 0.0), "log": str(self.log_path)}
