"""``local-store``: LocalAI's vector store (StoresSet/Get/Delete/Find), optionally durable.

This module only translates protocol messages to ``inferd.engines.store.VectorStore``
and back (docs/local-store.md has the user view). Semantics follow LocalAI's
``backend/go/local-store/store.go``:

LoadModel
    Names the store. Newer LocalAI sends ``store://NAME`` in ``ModelOptions.Model``
    (``store://`` alone is the default store); older LocalAI sent the name raw (``""``
    by default). Both are accepted. Like newer LocalAI, a name that is evidently a model
    file (a path, or ``.gguf``/``.bin``/...) is refused, so a loader probing backends
    with an LLM's name does not bind it to a vector store. Nothing is read from disk for
    a memory-only store; with ``--store-path DIR`` each name has its own directory under
    DIR (``_default`` for the default store) and its log is replayed. ``Options``
    (``key:value``) tune the engine: ``ann`` (hnsw | off), ``ann_threshold``,
    ``ann_recall``, ``ann_max_topk``, ``compact_bytes``.

Stores* without LoadModel
    LocalAI's Go store exists from process start and its Load only validates the
    name, so Stores calls work before any LoadModel: they use the default store.

Free
    Closes the store. A memory-only store's data is dropped (as when LocalAI stops the
    backend process); a durable one stays on disk and is reloaded by the next LoadModel.

Errors: invalid requests raise ``InvalidArgument`` naming the field (``Keys[3]``,
``Values``, ``Key``, ``TopK``): dimension mismatch, Keys/Values length mismatch, empty
Keys on Set/Delete, NaN/inf, zero vectors, TopK <= 0.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from inferd.backends.base import Backend
from inferd.backends.context import CallContext
from inferd.backends.options import option_bool, option_float, option_int, split_options
from inferd.engines.store import StoreConfig, StoreCorrupt, StoreInputError, VectorStore
from inferd.errors import FailedPrecondition, InvalidArgument, LoadError
from inferd.proto import backend_pb2 as pb

log = logging.getLogger("inferd.backends.local_store")

NAMESPACE_PREFIX = "store://"  # LocalAI's pkg/store NamespacePrefix
_MODEL_FILE = re.compile(r"\.(gguf|ggml|bin|onnx|safetensors|pt|pth|ckpt|yaml|yml|tflite|pb)$", re.IGNORECASE)
_OPTION_TYPES: dict[str, type] = {f.name: type(f.default) for f in fields(StoreConfig)}


def store_name(model: str) -> str:
    """The store namespace in ``ModelOptions.Model``; raises LoadError if it is not one."""
    if model.startswith(NAMESPACE_PREFIX):
        return model[len(NAMESPACE_PREFIX) :]
    if "/" in model or "\\" in model or _MODEL_FILE.search(model):
        raise LoadError(
            f"local-store: refusing to load {model!r}: not a store namespace "
            f"(expected {NAMESPACE_PREFIX!r} prefix or a plain store name)"
        )
    return model


def store_dirname(name: str) -> str:
    """A safe, injective directory name for a store name (no '/', no '..', bounded length)."""
    if name == "":
        return "_default"
    encoded = "s_" + quote(name, safe="-_.~")
    if len(encoded) > 200:
        encoded = "h_" + hashlib.sha256(name.encode()).hexdigest()
    return encoded


def parse_options(items: list[str] | Any) -> StoreConfig:
    """``key:value`` (or ``key=value``) items over the defaults; unknown keys are ignored.

    Unknown keys are ignored rather than refused because LocalAI passes a store's model
    config ``options:`` to whichever store backend serves it.
    """
    cfg = StoreConfig()
    changes: dict[str, Any] = {}
    for key, value, raw in split_options(items):
        kind = _OPTION_TYPES.get(key)
        if kind is None:
            log.debug("local-store: ignoring option %r", raw)
        elif kind is bool:
            changes[key] = option_bool(key, value)
        elif kind is int:
            changes[key] = option_int(key, value)
        elif kind is float:
            changes[key] = option_float(key, value)
        else:
            changes[key] = value.strip()
    cfg = replace(cfg, **changes)
    if cfg.ann not in ("hnsw", "off"):
        raise LoadError(f"local-store: option 'ann': hnsw or off, got {cfg.ann!r}")
    if not 0.0 < cfg.ann_recall <= 1.0:
        raise LoadError(f"local-store: option 'ann_recall': in (0, 1], got {cfg.ann_recall}")
    if cfg.ann_threshold < 1 or cfg.compact_bytes < 0 or cfg.ann_max_topk < 1:
        raise LoadError("local-store: ann_threshold and ann_max_topk must be >= 1, compact_bytes >= 0")
    return cfg


def _keys(keys: Any) -> list[Any]:
    return [k.Floats for k in keys]


def _wrap(mat: np.ndarray) -> list[pb.StoresKey]:
    return [pb.StoresKey(Floats=row) for row in mat.tolist()]


class LocalStoreBackend(Backend):
    """LocalAI's local-store over gRPC; see the module docstring."""

    name = "local-store"
    # Calls are serialized (LocalAI's local-store is base.SingleThread too): a Find is
    # a memory-bound scan that already uses the cores through BLAS, and serialization
    # keeps every write's fsync ordered with the reads that follow it.
    parallel = False
    # Stores* work before LoadModel (the default store), as in LocalAI.
    needs_model = False

    def __init__(self, settings: Any = None) -> None:
        super().__init__()
        self.store_path: str = getattr(settings, "store_path", "") or ""
        self.store: VectorStore | None = None
        self.namespace: str | None = None

    # ---- lifecycle -------------------------------------------------------------------
    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        name = store_name(options.Model)
        config = parse_options(options.Options)
        self._open(name, config)
        assert self.store is not None
        where = f"durable in {self._dir(name)}" if self.store.durable else "in memory"
        label = name or "default"
        return f"store {label!r} ready ({len(self.store)} entries, {where})"

    def unload(self) -> None:
        if self.store is not None:
            self.store.close()
        self.store = None
        self.namespace = None

    def _dir(self, name: str) -> Path:
        return Path(self.store_path) / store_dirname(name)

    def _open(self, name: str, config: StoreConfig) -> None:
        self.unload()
        path = self._dir(name) if self.store_path else None
        try:
            self.store = VectorStore(path, config)
        except StoreCorrupt as exc:
            raise LoadError(f"local-store: {exc}") from exc
        except OSError as exc:
            raise LoadError(f"local-store: cannot open {path}: {exc}") from exc
        self.namespace = name

    def _current(self) -> VectorStore:
        if self.store is None:
            try:
                self._open("", StoreConfig())
            except LoadError as exc:
                raise FailedPrecondition(exc.message) from exc
        assert self.store is not None
        return self.store

    def memory(self) -> tuple[int, dict[str, int]]:
        total, breakdown = super().memory()
        store = self.store
        if store is not None:
            st = store.stats()
            breakdown["store_entries"] = int(st["entries"])
            breakdown["store_key_bytes"] = int(st["key_bytes"])
            breakdown["store_value_bytes"] = int(st["value_bytes"])
            breakdown["store_ann_bytes"] = int(st.get("ann_bytes", 0))
        return total, breakdown

    # ---- capabilities ----------------------------------------------------------------
    def stores_set(self, request: pb.StoresSetOptions, ctx: CallContext) -> pb.Result:
        store = self._current()
        with _invalid():
            store.set(_keys(request.Keys), [v.Bytes for v in request.Values])
        return pb.Result(success=True, message=f"{len(request.Keys)} keys set")

    def stores_delete(self, request: pb.StoresDeleteOptions, ctx: CallContext) -> pb.Result:
        store = self._current()
        with _invalid():
            removed = store.delete(_keys(request.Keys))
        return pb.Result(success=True, message=f"{removed} keys deleted")

    def stores_get(self, request: pb.StoresGetOptions, ctx: CallContext) -> pb.StoresGetResult:
        store = self._current()
        with _invalid():
            keys, values = store.get(_keys(request.Keys))
        return pb.StoresGetResult(Keys=_wrap(keys), Values=[pb.StoresValue(Bytes=v) for v in values])

    def stores_find(self, request: pb.StoresFindOptions, ctx: CallContext) -> pb.StoresFindResult:
        store = self._current()
        with _invalid():
            found = store.find(list(request.Key.Floats), request.TopK)
        return pb.StoresFindResult(
            Keys=_wrap(found.keys),
            Values=[pb.StoresValue(Bytes=v) for v in found.values],
            Similarities=found.similarities.tolist(),
        )


class _invalid:  # noqa: N801 - used as a lowercase context manager
    """Turn the engine's StoreInputError into InvalidArgument (the engine knows no errors module)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, StoreInputError):
            raise InvalidArgument(exc.message, exc.field) from exc
        return False


__all__ = ["LocalStoreBackend", "parse_options", "store_dirname", "store_name"]
