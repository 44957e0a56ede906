"""The one exception clients raise, for networked and embedded calls alike."""

from __future__ import annotations

import grpc


class RpcError(Exception):
    """An rpc failed with a gRPC status ``code`` and a human ``details`` message."""

    def __init__(self, code: grpc.StatusCode, details: str, rpc: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.rpc = rpc

    @classmethod
    def from_grpc(cls, exc: grpc.aio.AioRpcError, rpc: str = "") -> RpcError:
        return cls(exc.code(), exc.details() or "", rpc)
