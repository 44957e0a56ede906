"""Small job tasks for the job runner's own tests (run in the runner's child process).

They exercise the runner's machinery (progress, stop, crash, queue) in milliseconds; the real
tasks (quantize, train, export) are tested end to end in tests/test_model_ops.py.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from inferd.engines.jobs.child import JobChannel, JobFailed, JobStopped


def count(params: dict[str, Any], channel: JobChannel) -> dict[str, Any]:
    """Emit ``n`` steps ``delay`` seconds apart; honour a stop between steps."""
    n, delay = int(params.get("n", 5)), float(params.get("delay", 0.05))
    for i in range(1, n + 1):
        time.sleep(delay)
        if channel.stop.is_set():
            raise JobStopped(f"stopped at {i - 1} (save={channel.save_on_stop})")
        channel.emit(status="training", current_step=i, total_steps=n, progress_percent=100.0 * i / n,
                     message=f"step {i}")
    return {"message": f"counted to {n}"}


def fail(params: dict[str, Any], channel: JobChannel) -> dict[str, Any]:
    raise JobFailed("the input was bad on purpose")


def die(params: dict[str, Any], channel: JobChannel) -> dict[str, Any]:
    """Killed like the kernel's OOM killer would: SIGKILL, no last words."""
    channel.emit(status="training", message="about to die")
    print("dying now", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)
    return {}


def deaf(params: dict[str, Any], channel: JobChannel) -> dict[str, Any]:
    """Ignores stop requests (a stuck native call): the runner must kill it after its grace."""
    channel.emit(status="training", message="not listening")
    time.sleep(60)
    return {}
