"""Charts for the bench scripts: ``--plot FILE`` writes a PNG next to the printed table.

One small helper shared by every bench (matplotlib's Agg backend: no display, no
window), so the scripts only hand over their numbers. Every chart carries a footnote
with the machine's CPU count and load average at the time it was drawn, since figures
from a busy machine are noisy and the chart should say so. ``make charts`` regenerates
``docs/charts/*.png``, which the docs embed.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def add_plot_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--plot", default="", metavar="FILE.png", help="also draw the results as a PNG chart")


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, ax: Any, path: str | os.PathLike[str], title: str, note: str) -> Path:
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ax.set_title(title, fontsize=11)
    one, five, fifteen = os.getloadavg()  # 5 and 15 minutes cover the run, not only its last moment
    machine = (f"{os.cpu_count()} CPUs, load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min), "
               f"{time.strftime('%Y-%m-%d')}")
    fig.text(0.01, 0.01, f"{note}  ({machine})" if note else machine, fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out)
    plt.close(fig)
    print(f"chart written to {out}")
    return out


def line_chart(path: str | os.PathLike[str], title: str, xlabel: str, ylabel: str,
               series: Mapping[str, Sequence[tuple[float, float]]], *, note: str = "", logx: bool = False,
               logy: bool = False) -> Path:
    """One line per series of ``(x, y)`` points; a series of one point is drawn as a marker."""
    fig, ax = _figure()
    for name, points in series.items():
        if not points:
            continue
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=name)
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    if logx:
        ax.set_xscale("log")
    else:
        ax.set_xticks(sorted({x for pts in series.values() for x, _ in pts}))
    if logy:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _save(fig, ax, path, title, note)


def bar_chart(path: str | os.PathLike[str], title: str, ylabel: str, groups: Sequence[str],
              series: Mapping[str, Sequence[float]], *, note: str = "") -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series in each."""
    fig, ax = _figure()
    names = [n for n, values in series.items() if values]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, series[name], width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _save(fig, ax, path, title, note)
