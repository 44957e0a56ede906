"""Checkpoints of a fine-tuning run: ``<output_dir>/checkpoint-<step>/`` as transformers' Trainer
writes them (adapter weights, optimizer and scheduler state, ``trainer_state.json``), plus
``inferd_base.json`` naming the base model so an export needs no ``model`` field.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE_INFO = "inferd_base.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    path: str
    step: int
    epoch: float
    loss: float
    created_at: str


def _state(path: Path) -> dict[str, Any]:
    try:
        with open(path / "trainer_state.json", encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(path: Path) -> Checkpoint | None:
    """One checkpoint directory, or None if it is not one."""
    match = _CHECKPOINT.match(path.name)
    if not match or not path.is_dir() or not (path / "adapter_config.json").is_file():
        return None
    state = _state(path)
    step = int(state.get("global_step") or match.group(1))
    losses = [e["loss"] for e in state.get("log_history", []) if "loss" in e and e.get("step", 0) <= step]
    created = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc)
    return Checkpoint(str(path), step, float(state.get("epoch") or 0.0), float(losses[-1]) if losses else 0.0,
                      created.isoformat(timespec="seconds"))


def list_checkpoints(output_dir: Path) -> list[Checkpoint]:
    """Checkpoints in ``output_dir``, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = [c for c in (describe(p) for p in output_dir.iterdir()) if c is not None]
    return sorted(found, key=lambda c: c.step)


def read_base_info(checkpoint: Path) -> dict[str, Any]:
    """The base model a checkpoint was trained from (its own copy, else the run's)."""
    for where in (checkpoint / BASE_INFO, checkpoint.parent / BASE_INFO):
        try:
            with open(where, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return {}
