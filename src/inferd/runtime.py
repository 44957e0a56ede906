"""The backend runtime: runs one rpc against one ``Backend``.

This is the single place that enforces the calling rules both fronts share (the
networked servicer and the embedded in-process client):

* capability check (UNIMPLEMENTED) before the model check (FAILED_PRECONDITION);
* serialization of non-parallel backends with ``backend.call_lock``, and busy counting;
* blocking backend code runs on a worker thread pool, never on the event loop;
* cancellation: a cancelled caller sets ``ctx.cancel()``, the runtime waits for the
  worker to notice and only then releases the lock, so the lock is never leaked and
  never released while the model is still busy;
* the lifecycle rpcs every backend gets for free (Health, LoadModel, Free, Status).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from inferd.backends.base import Backend
from inferd.backends.context import CallContext
from inferd.errors import InferdError, NoModelLoaded, NotFound, Unsupported
from inferd.proto import backend_pb2 as pb
from inferd.protocol import RPCS

log = logging.getLogger("inferd.runtime")

# rpcs that never take the backend's call lock nor count as "busy": they must answer
# while a long generation holds the lock (LocalAI polls Health/Status during calls).
UNGATED = frozenset({"Health", "Status", "GetMetrics", "FineTuneProgress", "QuantizationProgress"})

_HEALTH_REPLY = pb.Reply(message=b"OK")
# Metadata form of LocalAI's model identity, for clients whose stubs lack the field.
MODEL_IDENTITY_KEY = "x-model-identity"
_SENTINEL = object()


class BackendRuntime:
    """Dispatches rpcs to a backend with the rules above; knows nothing about gRPC."""

    def __init__(self, backend: Backend, max_workers: int = 10) -> None:
        self.backend = backend
        self.executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="inferd-work")
        self._supported = {name: backend.supports(name) for name in RPCS}
        self._listeners: list[Callable[[bool], None]] = []
        self.expected_model_identity: str | None = None

    # ---- observers (grpc.health.v1 follows the model state) --------------------
    def add_model_listener(self, callback: Callable[[bool], None]) -> None:
        self._listeners.append(callback)

    def _notify(self) -> None:
        for cb in self._listeners:
            try:
                cb(self.backend.loaded)
            except Exception:  # noqa: BLE001 - a listener must not break a call
                log.exception("model state listener failed")

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---- entry points -----------------------------------------------------------
    def health(self) -> pb.Reply:
        return _HEALTH_REPLY

    async def unary(self, rpc: str, request: Any, ctx: CallContext) -> Any:
        if rpc == "Health":
            return _HEALTH_REPLY
        if rpc == "Status":
            return self.status()
        if rpc == "LoadModel":
            return await self.load_model(request, ctx)
        if rpc == "Free":
            return await self.free(ctx)
        fn = self._resolve(rpc, request, ctx)
        async with self._gate(rpc):
            if inspect.iscoroutinefunction(fn):
                return await fn(request, ctx)
            return await self._run_blocking(ctx, fn, request, ctx)

    async def stream(self, rpc: str, request: Any, ctx: CallContext) -> AsyncIterator[Any]:
        """Yield the replies of a server-streaming rpc; closing the iterator cancels it."""
        fn = self._resolve(rpc, request, ctx)
        async with self._gate(rpc):
            if inspect.isasyncgenfunction(fn):
                agen = fn(request, ctx)
                try:
                    async for item in agen:
                        yield item
                finally:
                    ctx.cancel()
                    await agen.aclose()
                return
            iterator = await self._run_blocking(ctx, fn, request, ctx)
            finished = False
            try:
                while True:
                    item = await self._run_blocking(ctx, next, iterator, _SENTINEL)
                    if item is _SENTINEL:
                        finished = True
                        return
                    yield item
            finally:
                if not finished:
                    ctx.cancel()
                    close = getattr(iterator, "close", None)
                    if close is not None:
                        await self._run_blocking(ctx, close)

    # ---- lifecycle rpcs ---------------------------------------------------------
    def status(self) -> pb.StatusResponse:
        total, breakdown = self.backend.memory()
        return pb.StatusResponse(
            state=self.backend.state(),
            memory=pb.MemoryUsageData(total=total, breakdown=breakdown),
        )

    async def load_model(self, options: pb.ModelOptions, ctx: CallContext) -> pb.Result:
        if not self._supported_load():
            raise Unsupported(self.backend.name, "LoadModel")
        async with self._gate("LoadModel", serialize_always=True):
            if self.backend.loaded:
                await self._run_blocking(ctx, self.backend._free)
            try:
                message = await self._run_blocking(ctx, self.backend.load, options, ctx)
            except InferdError as exc:
                self.backend._mark_load_failed(exc.message)
                self._notify()
                return pb.Result(success=False, message=exc.message)
            except Exception as exc:  # noqa: BLE001 - any load failure is reported, not raised
                log.exception("LoadModel failed")
                reason = f"{type(exc).__name__}: {exc}"
                self.backend._mark_load_failed(reason)
                self._notify()
                return pb.Result(success=False, message=reason)
            self.backend._mark_loaded(options.Model or options.ModelFile)
            self.expected_model_identity = None
        self._notify()
        return pb.Result(success=True, message=message or "model loaded")

    async def free(self, ctx: CallContext) -> pb.Result:
        async with self._gate("Free", serialize_always=True):
            was_loaded = await self._run_blocking(ctx, self.backend._free)
        self._notify()
        return pb.Result(success=True, message="model freed" if was_loaded else "no model was loaded")

    def _supported_load(self) -> bool:
        return type(self.backend).load is not Backend.load

    # ---- the calling rules ------------------------------------------------------
    def _resolve(self, rpc: str, request: Any, ctx: CallContext) -> Callable[..., Any]:
        info = RPCS[rpc]
        if not self._supported[rpc]:
            raise Unsupported(self.backend.name, rpc)
        if info.needs_model:
            if not self.backend.loaded and getattr(self.backend, "needs_model", True):
                raise NoModelLoaded(self.backend.name, rpc)
            self.check_identity(ctx.metadata.get(MODEL_IDENTITY_KEY), request)
        return getattr(self.backend, info.method)

    def check_identity(self, claimed: str | None, request: Any = None) -> None:
        """Refuse a call meant for another model (LocalAI's model-identity convention).

        LocalAI (``pkg/grpc/server.go`` ``checkModelIdentity``, ``backend/python/common/
        model_identity.py``) sends the model a request is for in the request message's
        own ``ModelIdentity`` field (PredictOptions = 54, ...; set from the same
        ``ModelConfig.Model`` that became ``ModelOptions.Model`` at LoadModel) so a
        backend reached through a recycled port refuses instead of answering from the
        wrong model. Our stubs predate the field, so it is read from the message's
        unknown fields by number. ``claimed`` is the same value sent as metadata
        (``MODEL_IDENTITY_KEY``) by clients whose stubs lack the field.

        Either side empty skips the check (an older LocalAI, a load that named no
        model): a false rejection is worse than the miss. A mismatch is NOT_FOUND with
        "model identity mismatch" in the message: LocalAI's router requires both
        (``grpcerrors.IsModelMismatch``) before it drops its stale route.
        """
        requested = claimed or ""
        if not requested and request is not None:
            requested = getattr(request, "ModelIdentity", "") or ""
            number = {  # LocalAI's field numbers (backend/backend.proto)
                "PredictOptions": 54, "TranscriptRequest": 11, "GenerateImageRequest": 13,
                "GenerateVideoRequest": 15, "TTSRequest": 8, "VADRequest": 2,
                "SoundGenerationRequest": 18, "DetectOptions": 6, "RerankRequest": 4,
            }.get(type(request).__name__)
            if not requested and number is not None:
                from google.protobuf.unknown_fields import UnknownFieldSet

                for f in UnknownFieldSet(request):
                    if f.field_number == number and f.wire_type == 2:  # length-delimited string
                        requested = bytes(f.data).decode("utf-8", "replace")
        loaded = self.backend.model_name if self.backend.loaded else ""
        if requested and loaded and requested != loaded:
            raise NotFound(f"{self.backend.name}: model identity mismatch: loaded {loaded!r}, "
                           f"requested {requested!r}")

    @contextlib.asynccontextmanager
    async def _gate(self, rpc: str, serialize_always: bool = False) -> AsyncIterator[None]:
        if rpc in UNGATED:
            yield
            return
        lock = self.backend.call_lock if (serialize_always or not self.backend.parallel) else None
        if lock is not None:
            await lock.acquire()
        self.backend._enter()
        try:
            yield
        finally:
            self.backend._exit()
            if lock is not None:
                lock.release()

    async def _run_blocking(self, ctx: CallContext, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on a worker thread; on cancellation, stop it and wait for it."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            ctx.cancel()
            while not fut.done():
                # Keep the lock until the worker really stopped; repeated cancels
                # (e.g. server shutdown) do not abandon a running model call.
                with contextlib.suppress(BaseException):
                    await asyncio.shield(fut)
            raise
