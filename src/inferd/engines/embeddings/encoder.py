"""Sentence encoders: texts in, one vector per text out, as sentence-transformers does it.

Two engines with the same surface (``encode``, ``tokenize``, ``dim``):

* ``OnnxEncoder`` (the default): ``tokenizers`` + onnxruntime + numpy pooling. No torch
  at serve time. The graph is built from the safetensors weights by ``onnx_graph``.
* ``TorchEncoder``: sentence-transformers itself. Used only when asked for
  (``engine:torch``) or, with ``engine:auto``, when the ONNX builder does not know the
  architecture (logged as a WARNING and named in the LoadModel message; any other ONNX
  failure fails the load); it needs torch, which is not in the ``embeddings`` extra.

Why ONNX is the default: on the project's 2-core machine it gave the same vectors
(cosine >= 0.99999 on our test set) and was faster at every batch size we measured
(docs/embeddings.md has the numbers).

Encoders are not thread-safe for ``encode``: one thread (the dynamic batcher's worker)
calls it. ``tokenize`` uses its own tokenizer copy and may run on any thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from inferd.engines.embeddings.model_files import ModelSpec

log = logging.getLogger("inferd.engines.embeddings")

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")


@dataclass(frozen=True)
class Encoded:
    """The vectors for a list of texts and how many tokens each text became."""

    vectors: np.ndarray  # float32 [n, dim]
    token_counts: list[int]


class Encoder(Protocol):
    engine: str
    dim: int
    normalized: bool

    def encode(self, texts: Sequence[str]) -> Encoded: ...

    def tokenize(self, text: str) -> list[int]: ...

    def close(self) -> None: ...


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """sentence-transformers' Pooling over ``hidden`` [batch, seq, dim] with ``mask`` [batch, seq]."""
    m = mask[..., None].astype(np.float32)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return np.where(m > 0, hidden, np.float32(-1e9)).max(axis=1)
    summed = (hidden * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    if mode == "mean_sqrt_len":
        return summed / np.sqrt(counts)
    return summed / counts


def l2_normalize(v: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.clip(norms, 1e-12, None)


def _load_tokenizer(spec: ModelSpec, truncate: bool):
    from tokenizers import Tokenizer

    if spec.tokenizer_file is None:
        raise FileNotFoundError(f"{spec.path} has no tokenizer.json (the ONNX engine needs a fast tokenizer)")
    tok = Tokenizer.from_file(str(spec.tokenizer_file))
    # tokenizer.json may carry its own padding/truncation (this model's pads to a fixed
    # 128); sentence-transformers pads to the longest text and truncates at max_seq_length.
    tok.no_padding()
    tok.no_truncation()
    if truncate:
        tok.enable_truncation(max_length=spec.max_seq_length)
        pad_id = int(spec.config.get("pad_token_id") or 0)
        pad_token = tok.id_to_token(pad_id) or "[PAD]"
        tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tok


class OnnxEncoder:
    """tokenizers + onnxruntime + numpy pooling, matching the model's sentence-transformers config."""

    engine = "onnx"

    def __init__(self, spec: ModelSpec, threads: int = 0) -> None:
        import onnxruntime as ort

        from inferd.engines.embeddings.onnx_graph import UnsupportedArchitecture, ensure_graph

        if spec.pooling.mode not in POOLING_MODES:
            raise UnsupportedArchitecture(f"pooling mode {spec.pooling.mode!r} is not supported (have {POOLING_MODES})")
        self.spec = spec
        graph: str | bytes
        try:
            self.graph_path: Path | None = ensure_graph(spec)
            graph = str(self.graph_path)
        except OSError as exc:  # cache not writable (read-only home): build in memory every load
            log.warning("cannot cache the ONNX graph (%s); building it in memory", exc)
            from inferd.engines.embeddings.onnx_graph import build_bert_graph

            self.graph_path = None
            graph = build_bert_graph(spec).SerializeToString()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        opts.inter_op_num_threads = 1
        # Between batches the worker waits for requests; spinning threads would steal the
        # cores the gRPC server needs to receive them.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        self._tok = _load_tokenizer(spec, truncate=True)
        self._raw_tok = _load_tokenizer(spec, truncate=False)
        self.dim = int(spec.config["hidden_size"])
        self.normalized = spec.normalize

    def encode(self, texts: Sequence[str]) -> Encoded:
        encs = self._tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        types = np.array([e.type_ids for e in encs], dtype=np.int64)
        (hidden,) = self.session.run(
            ["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        )
        vectors = pool(hidden, mask, self.spec.pooling.mode)
        if self.spec.normalize:
            vectors = l2_normalize(vectors)
        return Encoded(np.ascontiguousarray(vectors, dtype=np.float32), [int(c) for c in mask.sum(axis=1)])

    def tokenize(self, text: str) -> list[int]:
        return list(self._raw_tok.encode(text).ids)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


class TorchEncoder:
    """sentence-transformers on torch (CPU): the reference the ONNX engine is checked against."""

    engine = "torch"
    #: Why ``auto`` chose torch instead of ONNX (empty when torch was asked for).
    fallback_reason = ""

    def __init__(self, spec: ModelSpec, threads: int = 0) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory never needs the hub
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.model = SentenceTransformer(str(spec.path), device="cpu")
        self.model.eval()
        has_fast = spec.tokenizer_file is not None
        self._tok = _load_tokenizer(spec, truncate=True) if has_fast else None
        self._raw_tok = _load_tokenizer(spec, truncate=False) if has_fast else None
        # renamed get_embedding_dimension in sentence-transformers 6; accept both
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim() or spec.config.get("hidden_size", 0))
        self.normalized = spec.normalize

    def encode(self, texts: Sequence[str]) -> Encoded:
        texts = list(texts)
        vectors = self.model.encode(texts, batch_size=max(1, len(texts)), convert_to_numpy=True)
        if self._tok is not None:
            counts = [sum(e.attention_mask) for e in self._tok.encode_batch(texts)]
        else:
            hf_tok = self.model.tokenizer
            counts = [len(ids) for ids in hf_tok(texts, truncation=True, max_length=self.spec.max_seq_length)["input_ids"]]
        return Encoded(np.ascontiguousarray(vectors, dtype=np.float32), counts)

    def tokenize(self, text: str) -> list[int]:
        if self._raw_tok is not None:
            return list(self._raw_tok.encode(text).ids)
        return list(self.model.tokenizer(text)["input_ids"])

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


def create_encoder(spec: ModelSpec, engine: str = "auto", threads: int = 0) -> Encoder:
    """Build the requested engine; ``auto`` is ONNX, with torch ONLY for unknown architectures.

    The fallback is deliberately narrow: it happens only when the ONNX graph builder says it
    cannot write this architecture (``UnsupportedArchitecture``), is logged as a WARNING and
    recorded in ``fallback_reason`` (the LoadModel message repeats it). Any other ONNX failure
    (corrupt weights, onnxruntime refusing the graph, a missing tokenizer) fails the load with
    its reason instead of silently switching to a slower engine with different numerics.
    If torch is not installed either, the error names both reasons.
    """
    from inferd.engines.embeddings.onnx_graph import UnsupportedArchitecture

    if engine not in ("auto", "onnx", "torch"):
        raise ValueError(f"unknown engine {engine!r} (auto, onnx or torch)")
    if engine == "torch":
        return TorchEncoder(spec, threads)
    try:
        return OnnxEncoder(spec, threads)
    except UnsupportedArchitecture as exc:
        if engine == "onnx":
            raise
        log.warning("ONNX engine cannot build %s (%s); FALLING BACK to sentence-transformers on torch",
                    spec.path, exc)
        try:
            encoder = TorchEncoder(spec, threads)
        except ImportError as torch_exc:
            raise RuntimeError(
                f"ONNX engine: {exc}; torch engine: {torch_exc} (pip install torch==2.13.0 sentence-transformers)"
            ) from exc
        encoder.fallback_reason = f"ONNX builder: {exc}"
        return encoder
