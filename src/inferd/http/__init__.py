"""The OpenAI-compatible HTTP front (FastAPI + uvicorn) over the supervisor's backends.

A front only translates: OpenAI JSON -> ``PredictOptions`` and friends, the backend's
replies -> OpenAI JSON/SSE. Backends are reached through ``inferd.client`` (gRPC), found
by model name in a ``ModelSource``. See docs/http.md. Needs the ``http`` extra
(``pip install 'inferd[http]'``); names are imported lazily so ``import inferd.http``
alone costs nothing.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "create_app": "inferd.http.app",
    "HttpServer": "inferd.http.server",
    "AddressSource": "inferd.http.source",
    "ManagerSource": "inferd.http.source",
    "ModelSource": "inferd.http.source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'inferd.http' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
