"""Calling a backend from a route: the client, error mapping, stream peeking, accounting.

``open_stream`` awaits the first reply before the route answers, so a request the
backend refuses (bad field, queue full, no such capability) gets a real HTTP status
instead of a 200 followed by an error event. Closing the returned iterator closes
the gRPC stream, which cancels the generation in the backend: a client that
disconnects mid-stream stops the work.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from inferd.client import Client, RpcError
from inferd.http.errors import from_rpc_error
from inferd.http.source import ModelSource
from inferd.observability.logs import log_call
from inferd.observability.metrics import Metrics


@dataclass
class CallScope:
    """One HTTP request's view of its backend call (model, timing, correlation id)."""

    source: ModelSource
    model: str
    correlation_id: str
    metrics: Metrics | None
    route: str
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Sent with each backend call: the backend's access log shows the same correlation id."""
        return (("x-correlation-id", self.correlation_id),)

    async def client(self) -> Client:
        return await self.source.client(self.model)

    async def unary(self, rpc: str, request: Any, timeout: float | None = None) -> Any:
        client = await self.client()
        try:
            return await client.call(rpc, request, timeout, self.metadata)
        except RpcError as exc:
            raise from_rpc_error(exc) from None

    async def open_stream(self, rpc: str, request: Any,
                          timeout: float | None = None) -> tuple[Any | None, AsyncIterator[Any]]:
        """Start a streaming call and wait for its first reply (``None`` when it sent none)."""
        client = await self.client()
        agen = client.call_stream(rpc, request, timeout, self.metadata)
        try:
            first = await agen.__anext__()
        except StopAsyncIteration:
            return None, agen
        except RpcError as exc:
            await agen.aclose()
            raise from_rpc_error(exc) from None
        except BaseException:
            await agen.aclose()
            raise
        return first, agen

    def saw_text(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            if self.metrics is not None:
                self.metrics.ttft.labels("http", self.model).observe(self.first_token_at - self.started)

    def finished(self, reply: Any | None, code: str = "OK") -> None:
        """Account a finished generation and write its access-log line."""
        if reply is not None and self.metrics is not None and hasattr(reply, "prompt_tokens"):
            self.metrics.observe_generation("http", self.model, reply.prompt_tokens, reply.tokens,
                                            reply.timing_token_generation)
        log_call("http", self.route, self.model, self.correlation_id, time.perf_counter() - self.started, code)
