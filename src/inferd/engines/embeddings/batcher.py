"""The sentence encoder's dynamic batcher: the shared ``inferd.engines.batching`` one over texts.

Concurrent ``Embedding`` / ``Rerank`` calls submit their texts; the shared batcher merges
them into one ``encode`` call (see that module for the window, ``max_batch`` slicing and
cancellation rules). This module only says how ``Encoded`` results are joined and cut,
and keeps the names the embeddings backend and its tests use (``encode``, ``encode_sync``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from inferd.engines.batching import BatcherStats
from inferd.engines.batching import DynamicBatcher as _SharedBatcher
from inferd.engines.embeddings.encoder import Encoded

__all__ = ["BatcherStats", "DynamicBatcher"]


def _concat(parts: list[Encoded]) -> Encoded:
    return Encoded(np.concatenate([p.vectors for p in parts], axis=0),
                   [c for p in parts for c in p.token_counts])


def _take(encoded: Encoded, rows: Sequence[int]) -> Encoded:
    first = rows[0] if rows else 0
    if list(rows) == list(range(first, first + len(rows))):  # contiguous: a view, no copy
        return Encoded(encoded.vectors[first : first + len(rows)], encoded.token_counts[first : first + len(rows)])
    return Encoded(encoded.vectors[list(rows)], [encoded.token_counts[r] for r in rows])


class DynamicBatcher(_SharedBatcher[str, Encoded]):
    """Collects concurrent ``encode`` requests into batches run by one worker thread."""

    def __init__(
        self,
        encode: Callable[[Sequence[str]], Encoded],
        *,
        max_batch: int = 32,
        window_s: float = 0.003,
        workers: int = 1,
        name: str = "inferd-embed-batcher",
    ) -> None:
        super().__init__(encode, concat=_concat, take=_take, max_batch=max_batch, window_s=window_s,
                         workers=workers, name=name, closed_message="the embedding model was unloaded")

    async def encode(self, texts: Sequence[str]) -> Encoded:
        """Awaitable ``submit`` (safe on the event loop); a cancel drops a job not yet started."""
        return await self.process(texts)

    def encode_sync(self, texts: Sequence[str]) -> Encoded:
        return self.process_sync(texts)
