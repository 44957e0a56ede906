"""The job runner: starts each job in a child process, relays its progress, stops it.

Shared by quantization, fine-tuning and export (issue 13). One runner per backend keeps
the jobs by id. ``max_running`` jobs run at once (training two models at a time on a
small CPU only makes both slower); the rest wait as ``queued``. A job's child writes
progress on its own pipe (see ``child``); a reader thread here merges it into the ``Job``
and its watchers. When the child ends without saying how (a segfault, the kernel's OOM
killer, ``kill -9``), the job fails with the exit reason and the tail of its log; the
server is untouched.

Stopping: tasks that poll (training) get a stop command and end at the next step, with a
checkpoint when asked; tasks stuck in one native call (llama.cpp's quantizer) are killed
at once. Either way a child that has not ended ``stop_grace`` seconds later is killed,
and the job's ``cleanup`` files (a partial output) are removed unless it completed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from inferd.engines.jobs.child import EXIT_STOPPED
from inferd.engines.jobs.job import COMPLETED, FAILED, STOPPED, TERMINAL, Job
from inferd.engines.jobs.process import SparePool, kill_child, spawn_child
from inferd.errors import AlreadyExists, InvalidArgument, NotFound

log = logging.getLogger("inferd.jobs")

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Finished jobs remembered for late progress/stop calls (oldest forgotten first).
MAX_FINISHED = 256


def new_job_id(requested: str, field: str = "job_id") -> str:
    """The client's id if it is a safe name (it becomes a file name), else a fresh one."""
    if not requested:
        return uuid.uuid4().hex[:16]
    if not JOB_ID_RE.match(requested):
        raise InvalidArgument("must be 1-128 characters of letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit", field)
    return requested


class JobRunner:
    """Jobs by id; start, stop, watch. Thread-safe; knows nothing about gRPC."""

    def __init__(self, max_running: int = 1, stop_grace: float = 30.0, spares: Iterable[str] = ()) -> None:
        """``spares``: task targets to keep one pre-started child for (``process.SparePool``)."""
        self.max_running = max_running
        self.stop_grace = stop_grace
        self._jobs: dict[str, Job] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._kill_on_stop: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(max_running)
        self._closed = False
        self.spares = SparePool(spares)
        self.spares.fill()

    # ---- queries -------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}")
        return job

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def breakdown(self) -> dict[str, int]:
        """Counts, each running child's RSS and the idle spares', for Status's memory breakdown."""
        out = {"jobs_running": 0, "jobs_queued": 0}
        for job in self.jobs():
            if job.finished:
                continue
            if job.started is None:
                out["jobs_queued"] += 1
            else:
                out["jobs_running"] += 1
                if job.pid:
                    with contextlib.suppress(psutil.Error):
                        out[f"job_{job.kind}_{job.id}_rss"] = psutil.Process(job.pid).memory_info().rss
        spare_pids = self.spares.pids()
        if spare_pids:  # the idle pre-started children are memory the server holds too
            out["jobs_spare"] = len(spare_pids)
            out["jobs_spare_rss"] = 0
            for pid in spare_pids:
                with contextlib.suppress(psutil.Error):
                    out["jobs_spare_rss"] += psutil.Process(pid).memory_info().rss
        return out

    # ---- starting -------------------------------------------------------------------------
    def submit(self, kind: str, target: str, params: dict[str, Any], *, job_id: str, log_path: Path,
               cleanup: list[Path] | None = None, kill_on_stop: bool = False, queue: bool = True,
               start_status: str = "running", on_end: Callable[[Job], None] | None = None) -> Job:
        """Register and start a job; ``target`` is the child's ``module:function``.

        ``queue=False`` runs it at once whatever else runs (a short export a caller waits for).
        ``start_status`` is published when its process starts (the kind's first status word).
        """
        job = Job(job_id, kind, params, log_path, cleanup)
        with self._lock:
            if self._closed:
                raise InvalidArgument("the server is shutting down", "job_id")
            old = self._jobs.get(job_id)
            if old is not None and not old.finished:
                raise AlreadyExists(f"job {job_id!r} is still {old.status}; stop it or use another job_id")
            self._jobs.pop(job_id, None)
            self._jobs[job_id] = job
            self._kill_on_stop[job_id] = kill_on_stop
            self._forget_old()
        threading.Thread(target=self._run, args=(job, target, queue, start_status, on_end),
                         name=f"job-{job_id}", daemon=True).start()
        return job

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.finished]
        for job in sorted(finished, key=lambda j: j.ended or 0)[:max(0, len(finished) - MAX_FINISHED)]:
            self._jobs.pop(job.id, None)
            self._kill_on_stop.pop(job.id, None)

    def _run(self, job: Job, target: str, queue: bool, start_status: str,
             on_end: Callable[[Job], None] | None) -> None:
        slot = False
        try:
            if queue:
                while not (slot := self._slots.acquire(timeout=0.2)):
                    if job.stop_requested or self._closed:
                        job.publish({"status": STOPPED, "message": "stopped before it started"})
                        return
            if job.stop_requested:
                job.publish({"status": STOPPED, "message": "stopped before it started"})
                return
            self._run_child(job, target, start_status)
        except Exception as exc:  # noqa: BLE001 - a runner error fails the job, not the server
            log.exception("job %s failed to run", job.id)
            job.publish({"status": FAILED, "message": f"could not run the job: {type(exc).__name__}: {exc}"})
        finally:
            if slot:
                self._slots.release()
            if job.status != COMPLETED:
                for path in job.cleanup:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            with self._lock:
                self._procs.pop(job.id, None)
            if on_end is not None:
                with contextlib.suppress(Exception):
                    on_end(job)
            if not self._closed:
                self.spares.fill()  # after the job, not during it: its imports would compete

    def _run_child(self, job: Job, target: str, start_status: str) -> None:
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log_path, "ab") as logf:
            logf.write(f"=== job {job.id} ({job.kind}) started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            logf.flush()
            params = {k: v for k, v in job.params.items() if k != "_env"}
            spare = self.spares.take(target, job.params.get("_env"))
            if spare is not None:
                proc, read_fd = spare
                params["_log"] = str(job.log_path)  # the spare writes to /dev/null until told
            else:
                proc, read_fd = spawn_child(target, logf, job.params.get("_env"))
        job.pid, job.started = proc.pid, time.time()
        job.publish({"status": start_status, "message": f"started (pid {proc.pid}); log {job.log_path}"})
        with self._lock:
            self._procs[job.id] = proc
        assert proc.stdin is not None
        try:
            proc.stdin.write((json.dumps(params) + "\n").encode())
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        if job.stop_requested:  # a stop that arrived while the child was starting
            self._signal_stop(job, proc, bool(job.params.get("_save_on_stop")))
        with os.fdopen(read_fd, "rb") as events:
            for raw in events:
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(event, dict) and isinstance(event.get("status"), str):
                    event["job_id"] = job.id
                    job.publish(event)
        code = proc.wait()
        with contextlib.suppress(OSError):
            proc.stdin.close()
        if job.status not in TERMINAL:
            job.publish(self._exit_event(job, code))

    def _exit_event(self, job: Job, code: int) -> dict[str, Any]:
        if job.stop_requested and (code == EXIT_STOPPED or code < 0):
            return {"status": STOPPED, "message": "stopped on request"}
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            why = " (the kernel's out-of-memory killer sends this)" if code == -signal.SIGKILL else ""
            reason = f"the job's process was killed by {name}{why}"
        else:
            reason = f"the job's process exited with status {code} without a result"
        return {"status": FAILED, "message": f"{reason}; log {job.log_path}: {tail(job.log_path)}"}

    # ---- stopping -------------------------------------------------------------------------
    def stop(self, job_id: str, save_checkpoint: bool = False) -> Job:
        """Ask a job to stop; returns at once (watch the job for the ``stopped`` update)."""
        job = self.get(job_id)
        if job.finished:
            return job
        job.stop_requested = True
        job.params["_save_on_stop"] = save_checkpoint
        with self._lock:
            proc = self._procs.get(job_id)
        if proc is not None:
            self._signal_stop(job, proc, save_checkpoint)
        return job

    def _signal_stop(self, job: Job, proc: subprocess.Popen[bytes], save_checkpoint: bool) -> None:
        if self._kill_on_stop.get(job.id):
            kill_child(proc)
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write((json.dumps({"cmd": "stop", "save_checkpoint": save_checkpoint}) + "\n").encode())
            proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass
        timer = threading.Timer(self.stop_grace, kill_child, args=(proc,))
        timer.daemon = True
        timer.start()

    def shutdown(self) -> None:
        """Kill every child (the server is going away; no job outlives it)."""
        with self._lock:
            self._closed = True
            procs = list(self._procs.values())
            for job in self._jobs.values():
                job.stop_requested = True
        for proc in procs:
            kill_child(proc)
        self.spares.close()


def tail(path: Path, lines: int = 6, max_chars: int = 1500) -> str:
    """The last non-empty lines of a log, for a failure message."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-max_chars:]
