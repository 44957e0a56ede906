"""Reranking with the bi-encoder: relevance = cosine(embed(query), embed(document)).

Why not a cross-encoder: a cross-encoder (e.g. ms-marco-MiniLM) scores better, but no
PyPI package we could find ships cross-encoder weights for offline use. The candidates
in the package index (flashrank, mxbai-rerank, rerankers-style wrappers) download their
models from a model hub at first use, which this deployment cannot do. So ``Rerank``
embeds the query and the documents with the loaded sentence-embedding model (one
batched forward) and sorts the documents by cosine similarity. Scores are in [-1, 1],
not calibrated probabilities; compare them only within one request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inferd.engines.embeddings.encoder import l2_normalize


@dataclass(frozen=True)
class RankedDocument:
    index: int  # position in the request's documents
    text: str
    score: float


def rank_by_cosine(
    query_vec: np.ndarray, doc_vecs: np.ndarray, documents: list[str], top_n: int = 0
) -> list[RankedDocument]:
    """Documents sorted by cosine to the query, best first; ``top_n <= 0`` keeps all.

    Ties keep the documents' original order (stable sort), so equal documents rank
    deterministically.
    """
    if len(documents) != doc_vecs.shape[0]:
        raise ValueError(f"{len(documents)} documents but {doc_vecs.shape[0]} vectors")
    q = l2_normalize(np.asarray(query_vec, dtype=np.float32).reshape(1, -1))[0]
    d = l2_normalize(np.asarray(doc_vecs, dtype=np.float32))
    scores = d @ q
    order = np.argsort(-scores, kind="stable")
    if top_n > 0:
        order = order[:top_n]
    return [RankedDocument(int(i), documents[int(i)], float(scores[int(i)])) for i in order]
