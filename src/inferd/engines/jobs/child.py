"""The child-process side of a job: ``python -m inferd.engines.jobs TARGET EVENT_FD``.

Why a child process: quantizing or training can crash in native code or be killed by the
kernel for memory; in a child that fails the job, never the server. The protocol is small:

* stdin, first line: the job's parameters as JSON; later lines: commands
  (``{"cmd": "stop", "save_checkpoint": bool}``). EOF on stdin means the server is gone:
  the child exits at once, so no job outlives its server.
* ``EVENT_FD`` (a pipe inherited from the parent, separate from stdout so that library
  chatter cannot corrupt it): one JSON object per line, merged into the job's progress.
* stdout/stderr: the job's log file (a pre-started spare redirects them there when its
  parameters, with ``_log``, arrive; see ``process``).

``TARGET`` is ``module:function``; the function gets ``(params, channel)`` and returns the
fields of the final ``completed`` update (or raises ``JobFailed`` / ``JobStopped``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import traceback
from typing import Any

from inferd.engines.jobs.job import COMPLETED, FAILED, STOPPED

#: Exit status of a child that ended because it was told to stop.
EXIT_STOPPED = 3


class JobFailed(Exception):
    """The job cannot complete; the message is the reason a person can act on."""


class JobStopped(Exception):
    """The job honoured a stop request."""


class JobChannel:
    """What a task sees of its job: emit progress, and the stop request."""

    def __init__(self, event_fd: int) -> None:
        self._out = os.fdopen(event_fd, "w", buffering=1, encoding="utf-8")
        self._write_lock = threading.Lock()
        self.stop = threading.Event()
        self.save_on_stop = False
        #: Set by tasks that cannot poll (one long native call): a stop then exits at once.
        self.exit_on_stop = False

    def emit(self, **fields: Any) -> None:
        line = json.dumps(fields, default=float)
        with self._write_lock:
            self._out.write(line + "\n")
            self._out.flush()

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise JobStopped("stopped on request")

    def _read_commands(self) -> None:
        for line in sys.stdin:
            try:
                cmd = json.loads(line)
            except ValueError:
                continue
            if cmd.get("cmd") == "stop":
                self.save_on_stop = bool(cmd.get("save_checkpoint"))
                self.stop.set()
                if self.exit_on_stop:
                    os._exit(EXIT_STOPPED)
        os._exit(EXIT_STOPPED)  # the server went away: no orphaned work


def redirect_output(path: str) -> None:
    """Point this process's stdout and stderr (the file descriptors, so native code too) at ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str]) -> int:
    target, event_fd = argv[0], int(argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    channel = JobChannel(event_fd)
    module_name, _, func_name = target.partition(":")
    try:
        # the task's imports come BEFORE the parameters: a pre-started spare (``process``)
        # has them done by the time a job arrives
        func: Any = getattr(importlib.import_module(module_name), func_name)
    except BaseException as exc:  # noqa: BLE001 - reported once the job's parameters arrive
        func = exc
    line = sys.stdin.readline()
    if not line:
        return 0  # an unused spare whose server went away
    params = json.loads(line)
    if "_log" in params:  # a spare: its output went to /dev/null until now
        redirect_output(params.pop("_log"))
    threading.Thread(target=channel._read_commands, name="job-commands", daemon=True).start()
    try:
        if isinstance(func, BaseException):
            raise func
        result = func(params, channel) or {}
    except JobStopped as exc:
        channel.emit(status=STOPPED, message=str(exc) or "stopped")
        return EXIT_STOPPED
    except JobFailed as exc:
        print(f"job failed: {exc}", file=sys.stderr)
        channel.emit(status=FAILED, message=str(exc))
        return 1
    except BaseException as exc:  # noqa: BLE001 - any error fails the job with its reason
        traceback.print_exc()
        if channel.stop.is_set():
            channel.emit(status=STOPPED, message="stopped on request")
            return EXIT_STOPPED
        channel.emit(status=FAILED, message=f"{type(exc).__name__}: {exc}")
        return 1
    channel.emit(**{"status": COMPLETED, "progress_percent": 100.0, **result})
    return 0
