"""The client's retry policy: UNAVAILABLE on idempotent calls is retried with backoff.

Why: behind a load balancer or Ray Serve, a replica can go away under a call (crash,
scale-down, a node lost) while its siblings keep serving; a model being (re)loaded answers
UNAVAILABLE ("retry") too. The call itself was fine, so the client library, not every
caller, retries it. The rules (``RetryPolicy``, off unless a client is given one):

* Only IDEMPOTENT rpcs are retried: everything except the state-changing ones in
  ``NOT_IDEMPOTENT`` (LoadModel, Free, starting/stopping/exporting jobs), which a caller
  must decide to repeat.
* Retryable statuses: ``codes`` (UNAVAILABLE by default), and, with ``lost_replica``
  (default on), Ray Serve's report that the replica died under the call: its proxy answers
  INTERNAL "The actor died unexpectedly ..." / "... actor is dead ...", which means the
  same as UNAVAILABLE (the serving process went away) and not a bug in the request.
* Up to ``max_attempts`` attempts in all, exponential backoff with full jitter between
  ``initial_backoff`` and ``max_backoff``; a call's ``timeout`` bounds all attempts together.
* Streams: retried transparently while no reply has reached the caller (gRPC's own retry
  semantics: a stream is committed by its first reply). After that, only with
  ``replay_streams``: the request is sent again and the replies the caller already has are
  skipped, so the caller sees one uninterrupted stream. That is exact when the request is
  deterministic (greedy decoding or a fixed Seed on the same model); otherwise the rest of
  the stream comes from a new sample. Off by default for that reason.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from inferd.client.errors import RpcError

T = TypeVar("T")

#: rpcs whose repetition is not harmless: never retried by the client.
NOT_IDEMPOTENT = frozenset({"LoadModel", "Free", "StartFineTune", "StopFineTune", "StartQuantization",
                            "StopQuantization", "ExportModel"})
#: How Ray Serve's proxy words "the replica process died under this call" (an INTERNAL status).
RAY_LOST_REPLICA_MARKERS = ("The actor died unexpectedly", "actor is dead", "ActorDiedError",
                            "ActorUnavailableError", "The actor is temporarily unavailable")


@dataclass(frozen=True)
class RetryPolicy:
    """How many times, after which statuses and how far apart a call is retried."""

    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 3.0
    multiplier: float = 2.0
    codes: frozenset[grpc.StatusCode] = field(default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE}))
    lost_replica: bool = True
    replay_streams: bool = False
    #: Called as on_retry(rpc, error, attempt) before each new attempt (logs, metrics, tests).
    on_retry: Callable[[str, RpcError, int], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 100:
            raise ValueError(f"max_attempts must be 1-100, got {self.max_attempts}")
        if not (0 <= self.initial_backoff <= self.max_backoff <= 600) or self.multiplier < 1:
            raise ValueError("backoff: need 0 <= initial_backoff <= max_backoff <= 600 and multiplier >= 1")

    def retryable(self, rpc: str, exc: BaseException) -> bool:
        """Is ``exc`` from ``rpc`` worth another attempt under this policy?"""
        if rpc in NOT_IDEMPOTENT or not isinstance(exc, RpcError):
            return False
        if exc.code in self.codes:
            return True
        return (self.lost_replica and exc.code == grpc.StatusCode.INTERNAL
                and any(m in exc.details for m in RAY_LOST_REPLICA_MARKERS))

    def notify(self, rpc: str, exc: RpcError, attempt: int) -> None:
        if self.on_retry is not None:
            self.on_retry(rpc, exc, attempt)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (full jitter)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(0, ceiling)


class _Budget:
    """The call's overall deadline, shared by its attempts."""

    def __init__(self, timeout: float | None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def sleep(self, seconds: float) -> bool:
        """Sleep before the next attempt; False when that would pass the deadline."""
        left = self.remaining()
        if left is not None and seconds >= left:
            return False
        await asyncio.sleep(seconds)
        return True


async def unary_with_retry(policy: RetryPolicy, rpc: str, timeout: float | None,
                           attempt: Callable[[float | None], Awaitable[T]]) -> T:
    """Run ``attempt(timeout_left)`` until it succeeds, fails for good, or attempts run out."""
    budget = _Budget(timeout)
    n = 1
    while True:
        try:
            return await attempt(budget.remaining())
        except RpcError as exc:
            if n >= policy.max_attempts or not policy.retryable(rpc, exc) or not await budget.sleep(policy.backoff(n)):
                raise
            policy.notify(rpc, exc, n)
        n += 1


async def stream_with_retry(policy: RetryPolicy, rpc: str, timeout: float | None,
                            open_stream: Callable[[float | None], AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """Yield one stream's replies, re-opening it after a retryable failure (rules above)."""
    budget = _Budget(timeout)
    delivered = 0
    n = 1
    while True:
        stream = open_stream(budget.remaining())
        seen = 0
        try:
            async for reply in stream:
                seen += 1
                if seen <= delivered:
                    continue  # a replayed reply the caller already has
                delivered += 1
                yield reply
            return
        except RpcError as exc:
            committed = delivered > 0 and not policy.replay_streams
            if (committed or n >= policy.max_attempts or not policy.retryable(rpc, exc)
                    or not await budget.sleep(policy.backoff(n))):
                raise
            policy.notify(rpc, exc, n)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        n += 1
