"""The vector store engine behind the ``local-store`` backend (plain Python, no gRPC).

``VectorStore`` holds float32 keys -> bytes values with LocalAI local-store semantics,
an exact Find (int8 scan + exact re-scoring), an HNSW index above a size threshold and
optional durability (``wal``: fsynced append-only log + snapshots). Errors are
``inferd.errors`` exceptions (InvalidArgument naming the field, ResourceExhausted for a
full disk, FailedPrecondition for a read-only one).
"""

from inferd.engines.store.store import FindResult, StoreConfig, VectorStore
from inferd.engines.store.wal import StoreCorrupt

__all__ = ["FindResult", "StoreConfig", "StoreCorrupt", "VectorStore"]
