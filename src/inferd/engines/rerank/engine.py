"""The rerank engine: validate a request, score its pairs through the shared batcher, rank.

Plain Python in and out (no gRPC): ``await engine.rerank(query, documents, top_n)`` returns
``Reranked`` with the documents sorted best first and the tokens the model read. Every
(query, document) pair of every concurrent caller goes through one ``DynamicBatcher``
(``inferd.engines.batching``), so small requests arriving together share a forward and a
large one is run in ``max_batch`` slices of similar-length pairs.

Scores: ``sigmoid`` (default) maps the logit to (0, 1), what sentence-transformers'
``CrossEncoder`` and flashrank report for one-label rerankers; ``logit`` gives the raw
logit, which is what LocalAI's ``rerankers`` backend returns for a transformers
cross-encoder (its ``TransformerRanker.rank`` reports ``logits.squeeze()``). The order is
the same either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inferd.engines.batching import DynamicBatcher
from inferd.engines.embeddings.rerank import RankedDocument
from inferd.engines.rerank.cross_encoder import CrossEncoder, Scored
from inferd.errors import InvalidArgument

SCORE_MODES = ("sigmoid", "logit")
#: Documents one request may bring: far more than a rerank stage sees in practice, small
#: enough that one request cannot hold the model for minutes.
MAX_DOCUMENTS = 4096


@dataclass(frozen=True)
class Reranked:
    results: list[RankedDocument]  # best first, at most top_n
    tokens: int  # tokens the model read: every pair, after truncation, with special tokens


def rank_scores(scores: np.ndarray, documents: Sequence[str], top_n: int = 0) -> list[RankedDocument]:
    """Documents sorted by ``scores``, best first; ``top_n <= 0`` keeps all; ties keep input order."""
    order = np.argsort(-scores, kind="stable")
    if top_n > 0:
        order = order[:top_n]
    return [RankedDocument(int(i), documents[int(i)], float(scores[int(i)])) for i in order]


class RerankEngine:
    """One cross-encoder behind a dynamic batcher."""

    def __init__(self, model: CrossEncoder, *, max_batch: int = 16, window_s: float = 0.002,
                 workers: int = 1, score: str = "sigmoid") -> None:
        if score not in SCORE_MODES:
            raise ValueError(f"score must be one of {', '.join(SCORE_MODES)}, got {score!r}")
        self.model = model
        self.score_mode = score
        self.batcher: DynamicBatcher[tuple[str, str], Scored] = DynamicBatcher(
            model.score, concat=Scored.concat, take=Scored.take, max_batch=max_batch, window_s=window_s,
            workers=workers, order_key=lambda pair: len(pair[0]) + len(pair[1]),
            name="inferd-rerank-batcher", closed_message="the reranker model was unloaded")

    @staticmethod
    def validate(query: str, documents: Sequence[str]) -> None:
        if not query:
            raise InvalidArgument("must not be empty", "query")
        if not documents:
            raise InvalidArgument("must not be empty", "documents")
        if len(documents) > MAX_DOCUMENTS:
            raise InvalidArgument(f"{len(documents)} documents; at most {MAX_DOCUMENTS} per request", "documents")

    def _ranked(self, query: str, documents: Sequence[str], top_n: int, scored: Scored) -> Reranked:
        logits = scored.logits.astype(np.float64)
        scores = 1.0 / (1.0 + np.exp(-logits)) if self.score_mode == "sigmoid" else logits
        return Reranked(rank_scores(scores, documents, top_n), int(sum(scored.token_counts)))

    async def rerank(self, query: str, documents: Sequence[str], top_n: int = 0) -> Reranked:
        """Score every document against ``query`` (awaits the batcher; never blocks the loop)."""
        self.validate(query, documents)
        scored = await self.batcher.process([(query, d) for d in documents])
        return self._ranked(query, documents, top_n, scored)

    def rerank_sync(self, query: str, documents: Sequence[str], top_n: int = 0) -> Reranked:
        self.validate(query, documents)
        return self._ranked(query, documents, top_n, self.batcher.process_sync([(query, d) for d in documents]))

    def close(self) -> None:
        self.batcher.close()
        self.model.close()
