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
    (``key:value``) tune the engine: every field of ``StoreConfig`` (``ann``,
    ``ann_threshold``, ``scan``, ``ann_build_nice``, ``compact_bytes``...), each bounded
    (an absurd value fails the load naming ``Options.<name>``).

Stores* without LoadModel
    LocalAI's Go store exists from process start and its Load only validates the
    name, so Stores calls work before any LoadModel: they use the default store.

Free
    Closes the store. A memory-only store's data is dropped (as when LocalAI stops the
    backend process); a durable one stays on disk and is reloaded by the next LoadModel.

Errors come from the engine as ``inferd.errors`` exceptions: ``InvalidArgument`` naming
the field (``Keys[3]``, ``Values``, ``Key``, ``TopK``) for a dimension mismatch, Keys/Values
length mismatch, empty Keys on Set/Delete, NaN/inf, zero vectors, TopK out of range or a
reply too large for the message limit; ``ResourceExhausted`` when the store's disk is full
and ``FailedPrecondition`` when its directory is read-only (the write is not applied,
acknowledged writes stay intact).

Paths: with ``INFERD_MODELS_DIR`` set, a durable store's directory must resolve inside it
(``inferd.paths.confine``: a store path elsewhere, or a store directory that is a symlink
out, is refused with the reason).
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
from inferd.engines.store import StoreConfig, StoreCorrupt, VectorStore
from inferd.engines.store.validation import MAX_TOP_K
from inferd.errors import FailedPrecondition, LoadError
from inferd.limits import MAX_THREADS, bounded_int, finite_float
from inferd.paths import confine
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
    if cfg.scan not in ("int8", "float32"):
        raise LoadError(f"local-store: option 'scan': int8 or float32, got {cfg.scan!r}")
    for name, low, high in _INT_BOUNDS:
        bounded_int(getattr(cfg, name), f"Options.{name}", low, high)
    finite_float(cfg.ann_recall, "Options.ann_recall", 1e-6, 1.0)
    finite_float(cfg.ann_time_ratio, "Options.ann_time_ratio", 0.0)
    finite_float(cfg.compact_ratio, "Options.compact_ratio", 0.0)
    return cfg


# Bounds on the integer options: absurd values (ann_m: 10**9) would exhaust memory or hang.
_INT_BOUNDS = (
    ("ann_threshold", 1, 2**40),
    ("ann_max_topk", 1, MAX_TOP_K),
    ("ann_m", 2, 128),
    ("ann_ef_construction", 8, 4096),
    ("ann_build_threads", 1, MAX_THREADS),
    ("ann_build_nice", 0, 19),
    ("ann_probe_size", 0, 1_000_000),
    ("scan_threads", 1, MAX_THREADS),
    ("compact_bytes", 0, 2**50),
)


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
        self.models_dir: str = getattr(settings, "models_dir", "") or ""
        self.max_reply_bytes: int | None = getattr(settings, "max_message_size", None)
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
        """The store's directory, confined to INFERD_MODELS_DIR when that is set."""
        path = Path(self.store_path) / store_dirname(name)
        return confine(path, self.models_dir or None, "Model") if self.models_dir else path

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
            breakdown["store_scan_bytes"] = int(st["scan_bytes"])
            breakdown["store_value_bytes"] = int(st["value_bytes"])
            breakdown["store_ann_bytes"] = int(st.get("ann_bytes", 0))
            breakdown["store_ann_ef"] = int(st["ann_ef"] or 0)  # 0: the exact scan answers
            breakdown["store_ann_building"] = int(st["ann_building"])
        return total, breakdown

    # ---- capabilities ----------------------------------------------------------------
    def stores_set(self, request: pb.StoresSetOptions, ctx: CallContext) -> pb.Result:
        self._current().set(_keys(request.Keys), [v.Bytes for v in request.Values])
        return pb.Result(success=True, message=f"{len(request.Keys)} keys set")

    def stores_delete(self, request: pb.StoresDeleteOptions, ctx: CallContext) -> pb.Result:
        removed = self._current().delete(_keys(request.Keys))
        return pb.Result(success=True, message=f"{removed} keys deleted")

    def stores_get(self, request: pb.StoresGetOptions, ctx: CallContext) -> pb.StoresGetResult:
        keys, values = self._current().get(_keys(request.Keys))
        return pb.StoresGetResult(Keys=_wrap(keys), Values=[pb.StoresValue(Bytes=v) for v in values])

    def stores_find(self, request: pb.StoresFindOptions, ctx: CallContext) -> pb.StoresFindResult:
        found = self._current().find(request.Key.Floats, request.TopK, max_reply_bytes=self.max_reply_bytes)
        return pb.StoresFindResult(
            Keys=_wrap(found.keys),
            Values=[pb.StoresValue(Bytes=v) for v in found.values],
            Similarities=found.similarities.tolist(),
        )


__all__ = ["LocalStoreBackend", "parse_options", "store_dirname", "store_name"]
