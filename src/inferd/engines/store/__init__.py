"""The vector store engine behind the ``local-store`` backend (plain Python, no gRPC).

``VectorStore`` holds float32 keys -> bytes values with LocalAI local-store semantics,
an exact numpy Find, an HNSW index above a size threshold and optional durability
(``wal``: fsynced append-only log + snapshots).
"""

from inferd.engines.store.store import FindResult, StoreConfig, StoreInputError, VectorStore
from inferd.engines.store.wal import StoreCorrupt

__all__ = ["FindResult", "StoreConfig", "StoreCorrupt", "StoreInputError", "VectorStore"]
