"""Sentence embeddings and bi-encoder reranking (plain Python; no gRPC here).

* ``model_files``: find a sentence-transformers model (path or installed package) and
  read its configuration and safetensors weights without torch.
* ``onnx_graph``: write a BERT encoder as an ONNX graph from those weights (cached).
* ``encoder``: ``OnnxEncoder`` (default, no torch) and ``TorchEncoder`` (reference).
* ``batcher``: ``DynamicBatcher``, which merges concurrent requests into one forward.
* ``rerank``: score documents against a query by the cosine of their embeddings.
"""

from inferd.engines.embeddings.batcher import BatcherStats, DynamicBatcher
from inferd.engines.embeddings.encoder import Encoded, Encoder, OnnxEncoder, TorchEncoder, create_encoder
from inferd.engines.embeddings.model_files import ModelNotFound, ModelSpec, read_spec, resolve_model_dir
from inferd.engines.embeddings.rerank import RankedDocument, rank_by_cosine

__all__ = [
    "BatcherStats",
    "DynamicBatcher",
    "Encoded",
    "Encoder",
    "ModelNotFound",
    "ModelSpec",
    "OnnxEncoder",
    "RankedDocument",
    "TorchEncoder",
    "create_encoder",
    "rank_by_cosine",
    "read_spec",
    "resolve_model_dir",
]
