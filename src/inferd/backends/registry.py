"""The one factory that picks a backend by name (TGI's ``get_model``).

The server never imports an engine by name: it asks ``create_backend(name)``. Names
map to ``module:Class`` strings so an engine's heavy imports (llama_cpp, onnxruntime)
happen only when that backend is chosen. ``--backend`` also accepts any
``package.module:Class`` for backends that live outside inferd.
"""

from __future__ import annotations

import importlib
from typing import Any

from inferd.backends.base import Backend
from inferd.errors import InvalidArgument

BACKENDS: dict[str, str] = {
    "llama-cpp": "inferd.backends.llama_cpp:LlamaCppBackend",
    "sentence-embeddings": "inferd.backends.sentence_embeddings:SentenceEmbeddingsBackend",
    "local-store": "inferd.backends.local_store:LocalStoreBackend",
    "silero-vad": "inferd.backends.silero_vad:SileroVadBackend",
    "piper": "inferd.backends.piper:PiperBackend",
    "whisper": "inferd.backends.whisper:WhisperBackend",
    "rerankers": "inferd.backends.rerankers:RerankersBackend",
    "onnx-detect": "inferd.backends.onnx_detect:OnnxDetectBackend",
    "diffusers": "inferd.backends.diffusers:DiffusersBackend",
}


def resolve_backend_class(name: str) -> type[Backend]:
    target = BACKENDS.get(name, name)
    if ":" not in target:
        known = ", ".join(sorted(BACKENDS))
        raise InvalidArgument(f"unknown backend {name!r}; known: {known}, or give module:Class", "backend")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument(
            f"backend {name!r} cannot be imported ({exc}); is its extra installed? "
            f"(pip install 'inferd[all]')",
            "backend",
        ) from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise InvalidArgument(f"{target} is not a Backend subclass", "backend")
    return cls


def create_backend(name: str, **kwargs: Any) -> Backend:
    """Instantiate the backend called ``name`` (constructor kwargs it accepts are passed)."""
    cls = resolve_backend_class(name)
    import inspect

    params = inspect.signature(cls.__init__).parameters
    accepted = {k: v for k, v in kwargs.items() if k in params}
    return cls(**accepted)
