"""How ``inferd quantize`` / ``inferd finetune`` show a job's progress, and the line they end with.

On a terminal: a live ``rich`` progress bar (percent, status, step and loss for training,
elapsed time and ETA) that the job's progress stream drives. Elsewhere (a pipe, a log,
CI): one plain line per update, which greps and diffs well. Either way the command ends
with one summary line (``quantize completed in 12.3s: ... -> FILE``), so a script can
read the outcome from the last line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO

TERMINAL = ("completed", "failed", "stopped")


class ProgressView(Protocol):
    def update(self, u: Any) -> None: ...
    def close(self, last: Any | None) -> None: ...


def summary(kind: str, last: Any | None, seconds: float) -> str:
    """The one line a job's command ends with."""
    took = _duration(seconds)
    if last is None:
        return f"{kind}: no progress received ({took})"
    if last.status not in TERMINAL:
        return f"{kind} interrupted at {last.progress_percent:.1f}% ({last.status}) after {took}"
    line = f"{kind} {last.status} in {took}"
    if kind == "finetune" and getattr(last, "current_step", 0):
        line += f": step {last.current_step}/{last.total_steps}, loss {last.loss:.4f}"
    metrics = dict(getattr(last, "extra_metrics", {}) or {})
    if kind == "quantize" and "compression_ratio" in metrics:
        line += f": {metrics['compression_ratio']:.2f}x smaller"
    target = getattr(last, "output_file", "") or getattr(last, "checkpoint_path", "")
    if target:
        line += f" -> {target}"
    elif last.status != "completed" and last.message:
        line += f": {last.message}"
    return line


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _detail(u: Any) -> str:
    if getattr(u, "current_step", 0):
        eta = f" eta {_duration(u.eta_seconds)}" if u.eta_seconds else ""
        return f"step {u.current_step}/{u.total_steps} loss {u.loss:.4f}{eta}"
    return str(u.message)[:60]


class PlainView:
    """One line per update (``show`` formats it), then the summary."""

    def __init__(self, kind: str, show: Callable[[Any], str], out: TextIO) -> None:
        self.kind, self.show, self.out = kind, show, out
        self.started = time.monotonic()

    def update(self, u: Any) -> None:
        print(self.show(u), file=self.out, flush=True)

    def close(self, last: Any | None) -> None:
        print(summary(self.kind, last, time.monotonic() - self.started), file=self.out, flush=True)


class BarView:
    """A live ``rich`` bar on a terminal, then the summary."""

    def __init__(self, kind: str, out: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.kind = kind
        self.started = time.monotonic()
        self.console = Console(file=out)
        self.progress = Progress(
            TextColumn("[bold]{task.description:<12}"), BarColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=True, refresh_per_second=8)
        self.task = self.progress.add_task(kind, total=100.0, detail="")
        self.progress.start()

    def update(self, u: Any) -> None:
        self.progress.update(self.task, completed=float(u.progress_percent), description=u.status,
                             detail=_detail(u))

    def close(self, last: Any | None) -> None:
        self.progress.stop()
        self.console.print(summary(self.kind, last, time.monotonic() - self.started), highlight=False)


def make_view(kind: str, show: Callable[[Any], str], mode: str = "auto", out: TextIO | None = None) -> ProgressView:
    """``bar`` on a terminal (``auto``) or when asked; ``plain`` lines otherwise or without rich."""
    out = out or sys.stdout
    if mode == "bar" or (mode == "auto" and out.isatty()):
        try:
            return BarView(kind, out)
        except ImportError:  # rich is in the llama extra; plain lines work everywhere
            pass
    return PlainView(kind, show, out)
