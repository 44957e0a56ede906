"""Starting a job's child process, and keeping a pre-started spare for the next job.

Why a spare: a child process costs ~0.3-0.4 s before its task runs (the interpreter, then
the task's imports: llama-cpp-python alone is ~0.3 s here). For a quantization of a small
model that is a third of the whole job: llama.cpp's own ``llama-quantize`` does the same
work in ~0.65 s for the packaged SmolLM2. A spare is a child started ahead of time for one
task: it has imported the task's module and waits on stdin for its parameters, so the job
starts at once. It stays single-use (each job still gets its own process, so a crash or an
out-of-memory kill only fails that job), it is refilled when a job ENDS rather than when
one starts (its imports would otherwise compete with the running job for the cores), and
it exits by itself when the server goes away (EOF on its stdin).

A spare writes to /dev/null until it is given a job; the job's parameters then carry
``_log``, the log file the child redirects its stdout/stderr to (``child.main``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("inferd.jobs")

_SRC_ROOT = str(Path(__file__).resolve().parents[3])  # .../src, so a child imports this inferd


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a job's child: offline model hubs, this inferd first on the path."""
    env = dict(os.environ)
    extra = dict(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_SRC_ROOT, extra.pop("PYTHONPATH", ""), env.get("PYTHONPATH", "")) if p)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "DISABLE_TQDM": "1"})
    env.update(extra)
    return env


def spawn_child(target: str, output: IO[bytes] | int, env_extra: dict[str, str] | None = None,
                ) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``python -m inferd.engines.jobs TARGET EVENT_FD``; returns (process, event read fd).

    The child gets its own session, so a kill reaches anything it started (``kill_child``).
    """
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inferd.engines.jobs", target, str(write_fd)],
            stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
            env=child_env(env_extra), start_new_session=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return proc, read_fd


def kill_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started


class SparePool:
    """At most one idle, pre-started child per target (see the module docstring)."""

    def __init__(self, targets: Iterable[str] = ()) -> None:
        self.targets = tuple(targets)
        self._spares: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.taken = 0  # jobs that started on a spare (tests and the bench read it)

    def fill(self) -> None:
        """Start a spare for every target that has none (a no-op when all are there)."""
        for target in self.targets:
            with self._lock:
                if self._closed or target in self._spares:
                    continue
                try:
                    self._spares[target] = spawn_child(target, subprocess.DEVNULL)
                except OSError as exc:  # no spare: jobs start the slow way, nothing else changes
                    log.warning("could not pre-start a job process for %s: %s", target, exc)

    def take(self, target: str, env_extra: dict[str, Any] | None) -> tuple[subprocess.Popen[bytes], int] | None:
        """A live spare for ``target`` (removed from the pool), or None: start one the usual way.

        A job with its own environment additions cannot use a spare (its environment is fixed).
        """
        if env_extra:
            return None
        with self._lock:
            spare = self._spares.pop(target, None)
            if spare is None:
                return None
            proc, read_fd = spare
            if proc.poll() is not None:  # died while idle (killed, out of memory): not usable
                os.close(read_fd)
                return None
            self.taken += 1  # under the lock: jobs of a runner with max_running > 1 take concurrently
        return spare

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spares, self._spares = list(self._spares.values()), {}
        for proc, read_fd in spares:
            kill_child(proc)
            with contextlib.suppress(OSError):
                os.close(read_fd)
            with contextlib.suppress(OSError):
                proc.wait(5)

    def pids(self) -> list[int]:
        with self._lock:
            return [proc.pid for proc, _ in self._spares.values()]
