"""Which backends to stop to make room: LRU past ``max_loaded``, memory pressure, groups.

Pure decisions over a snapshot of the running models (no processes, no I/O), so the
rules are tested directly; the manager acts on the answer. The rules (LocalAI's
loader features):

* pinned models are never chosen;
* ``max_loaded``: the least recently used others go first until the new one fits;
* memory threshold: past the percentage, the least recently used one goes (one per
  check, the next check measures again);
* a mutually exclusive group: starting a member stops every other running member;
* a busy backend is skipped unless ``force`` (LocalAI's force-eviction-when-busy).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Running:
    """One running (or starting) backend as the eviction rules see it."""

    name: str
    last_used: float
    pinned: bool = False
    busy: bool = False
    group: str = ""


def lru_victims(running: list[Running], newcomer: str, max_loaded: int, force: bool = False) -> list[str]:
    """Names to stop so that ``newcomer`` fits under ``max_loaded`` (0: unlimited)."""
    if max_loaded <= 0:
        return []
    others = [r for r in running if r.name != newcomer]
    excess = len(others) - max_loaded + 1
    if excess <= 0:
        return []
    candidates = sorted((r for r in others if not r.pinned and (force or not r.busy)), key=lambda r: r.last_used)
    return [r.name for r in candidates[:excess]]


def memory_victim(running: list[Running], used_percent: float, threshold: float, force: bool = False,
                  keep: str = "") -> str | None:
    """The least recently used evictable backend when memory use is past ``threshold`` percent."""
    if threshold <= 0 or used_percent < threshold:
        return None
    candidates = sorted((r for r in running if r.name != keep and not r.pinned and (force or not r.busy)),
                        key=lambda r: r.last_used)
    return candidates[0].name if candidates else None


def group_conflicts(running: list[Running], newcomer: str, group: str) -> list[Running]:
    """Running members of ``newcomer``'s exclusive group (which must stop before it starts)."""
    if not group:
        return []
    return [r for r in running if r.group == group and r.name != newcomer]
