"""The console's view of model-operation jobs, kept from the job rpcs' progress streams.

LocalAI's protocol has no rpc that lists jobs: a job is known by its id, and its progress
is a stream (QuantizationProgress / FineTuneProgress). So the board follows each job it
learns about with one stream task and keeps the latest update: jobs started from the
console, and running jobs of any ready backend that its ``Status`` memory breakdown names
(``job_<kind>_<id>_rss``, see ``engines.jobs.runner.JobRunner.breakdown``), so a job
started with ``inferd quantize --addr ...`` shows up too while it runs. The work stays in
the backend; this is a read model for a page.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from inferd.client import Client, RpcError

KINDS = ("quantize", "finetune")
TERMINAL = ("completed", "failed", "stopped")
_BREAKDOWN_JOB = re.compile(r"^job_(quantize|finetune)_(.+)_rss$")
#: Finished jobs kept on the board (oldest dropped first).
MAX_FINISHED = 50

ClientFor = Callable[[str], Awaitable[Client]]


@dataclass
class TrackedJob:
    job_id: str
    kind: str
    model: str
    started: float = field(default_factory=time.time)
    updated: float = 0.0
    update: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    task: asyncio.Task[None] | None = None

    @property
    def status(self) -> str:
        return str(self.update.get("status", "unknown")) if not self.error else "unknown"

    def row(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "kind": self.kind, "model": self.model, "started": self.started,
                "updated": self.updated, "status": self.status, "error": self.error, **self.update}


def breakdown_jobs(breakdown: dict[str, int]) -> list[tuple[str, str]]:
    """``(kind, job_id)`` of each running job a Status memory breakdown names."""
    out = []
    for key in breakdown:
        m = _BREAKDOWN_JOB.match(key)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


class JobBoard:
    """Jobs by id, each followed by one progress-stream task in the app's loop."""

    def __init__(self, client_for: ClientFor) -> None:
        self.client_for = client_for
        self.jobs: dict[str, TrackedJob] = {}

    def rows(self) -> list[dict[str, Any]]:
        return [j.row() for j in sorted(self.jobs.values(), key=lambda j: j.started, reverse=True)]

    def follow(self, model: str, kind: str, job_id: str) -> TrackedJob:
        """Start following ``job_id`` unless it is followed already (or finished)."""
        job = self.jobs.get(job_id)
        if job is not None and (job.task is not None and not job.task.done() or job.status in TERMINAL):
            return job
        job = job or TrackedJob(job_id, kind, model)
        self.jobs[job_id] = job
        job.error = ""
        job.task = asyncio.get_running_loop().create_task(self._watch(job))
        self._forget_old()
        return job

    async def _watch(self, job: TrackedJob) -> None:
        try:
            client = await self.client_for(job.model)
            method = client.quantization_progress if job.kind == "quantize" else client.fine_tune_progress
            async for update in method(job_id=job.job_id):
                job.update = json_format.MessageToDict(update, preserving_proto_field_name=True)
                job.updated = time.time()
        except RpcError as exc:
            job.error = f"{exc.code.name}: {exc.details}"
        except Exception as exc:  # noqa: BLE001 - the board shows why it lost the job; the page keeps working
            job.error = f"{type(exc).__name__}: {exc}"

    async def discover(self, model: str, client: Client) -> None:
        """Follow the running jobs ``model``'s backend reports in its Status breakdown."""
        with contextlib.suppress(RpcError, asyncio.TimeoutError):
            st = await client.status(timeout=2.0)
            for kind, job_id in breakdown_jobs(dict(st.memory.breakdown)):
                self.follow(model, kind, job_id)

    async def start(self, model: str, kind: str, fields: dict[str, Any]) -> TrackedJob:
        client = await self.client_for(model)
        if kind == "quantize":
            result = await client.start_quantization(**fields)
        else:
            result = await client.start_fine_tune(**fields)
        job = self.follow(model, kind, result.job_id)
        job.update = {"status": "queued", "message": result.message}
        return job

    async def stop(self, job_id: str) -> str:
        job = self.jobs[job_id]
        client = await self.client_for(job.model)
        if job.kind == "quantize":
            result = await client.stop_quantization(job_id=job_id)
        else:
            result = await client.stop_fine_tune(job_id=job_id, save_checkpoint=True)
        return str(result.message)

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.status in TERMINAL]
        for j in sorted(finished, key=lambda j: j.updated)[:max(0, len(finished) - MAX_FINISHED)]:
            self.jobs.pop(j.job_id, None)

    async def close(self) -> None:
        for job in self.jobs.values():
            if job.task is not None:
                job.task.cancel()
