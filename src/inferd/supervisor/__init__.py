"""The supervisor: owns backend processes (model manager, watchdog). See docs/supervisor.md.

``AsyncModelManager`` (asyncio-native; ``ModelManager`` is its blocking facade) starts
one ``inferd serve`` child per configured model on demand, reuses it, evicts the least
recently used beyond ``max_loaded`` or past a memory threshold (never a pinned model),
keeps mutually exclusive groups exclusive, restarts crashed ones on the next request,
and applies LocalAI's busy/idle watchdog timeouts.

Exports are resolved lazily: ``inferd.cli`` imports ``inferd.supervisor.cli`` for every
command (``inferd serve`` included, i.e. every backend child), which must not pay for the
client stack.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ConfigError": "inferd.supervisor.config",
    "ModelSpec": "inferd.supervisor.config",
    "SupervisorConfig": "inferd.supervisor.config",
    "load_config": "inferd.supervisor.config",
    "AsyncModelManager": "inferd.supervisor.async_manager",
    "ModelError": "inferd.supervisor.async_manager",
    "ModelManager": "inferd.supervisor.manager",
    "ModelProxy": "inferd.supervisor.manager",
    "Watchdog": "inferd.supervisor.watchdog",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'inferd.supervisor' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
