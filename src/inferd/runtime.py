"""The backend runtime: runs one rpc against one ``Backend``.

This is the single place that enforces the calling rules both fronts share (the
networked servicer and the embedded in-process client):

* capability check (UNIMPLEMENTED) before the lifecycle gate (UNAVAILABLE while
  LoadModel/Free run) before the model check (FAILED_PRECONDITION);
* the lifecycle gate (``inferd.lifecycle``): every model call holds a lease until its
  work has stopped; LoadModel/Free refuse new calls, withdraw the ones in flight, wait
  for them (bounded) and only then unload/load, so no engine frees memory under a call;
* serialization of non-parallel backends with ``backend.call_lock``, and busy counting;
* blocking backend code runs on a worker thread pool, never on the event loop (Status's
  memory probes included, on their own thread);
* cancellation: a cancelled caller sets ``ctx.cancel()`` and waits, at most
  ``CANCEL_WAIT_S``, for the worker to notice; a worker that has not stopped by then
  keeps the call's lease (and lock) until it ends, so the lock is never released while
  the model is still busy, and no caller waits forever;
* the lifecycle rpcs every backend gets for free (Health, LoadModel, Free, Status).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from inferd.backends.base import Backend
from inferd.backends.context import CallContext
from inferd.errors import Cancelled, DeadlineExceeded, InferdError, NoModelLoaded, Unavailable, Unsupported
from inferd.lifecycle import LOADING, UNLOADING, Lease, Writer, consume_result
from inferd.memory_probe import MemoryProbe
from inferd.model_identity import MODEL_IDENTITY_KEY, check_model_identity
from inferd.proto import backend_pb2 as pb
from inferd.protocol import RPCS

log = logging.getLogger("inferd.runtime")

# rpcs that never take a lease nor the backend's call lock, nor count as "busy": they must
# answer while a long generation holds the lock or LoadModel/Free hold the gate (LocalAI
# polls Health/Status during calls). The model-operation rpcs never touch the loaded model
# (their jobs run in child processes): a LoadModel/Free must not withdraw an ExportModel.
UNGATED = frozenset({"Health", "Status", "GetMetrics", "FineTuneProgress", "QuantizationProgress",
                     "StartFineTune", "StopFineTune", "ListCheckpoints", "ExportModel",
                     "StartQuantization", "StopQuantization"})

_HEALTH_REPLY = pb.Reply(message=b"OK")
_SENTINEL = object()
#: How long a cancelled caller waits for its worker thread to stop before returning.
CANCEL_WAIT_S = 5.0
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_LOAD_TIMEOUT_S = 600.0


class BackendRuntime:
    """Dispatches rpcs to a backend with the rules above; knows nothing about gRPC."""

    def __init__(self, backend: Backend, max_workers: int = 10, *,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
                 load_timeout: float = DEFAULT_LOAD_TIMEOUT_S) -> None:
        self.backend = backend
        self.gate = backend.lifecycle
        self.drain_timeout = drain_timeout
        self.load_timeout = load_timeout
        self.executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="inferd-work")
        self._probe = MemoryProbe(backend.memory)
        self._supported = {name: backend.supports(name) for name in RPCS}
        self._listeners: list[Callable[[bool], None]] = []
        self._background: set[asyncio.Task] = set()
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
        self._probe.shutdown()

    # ---- entry points -----------------------------------------------------------
    def health(self) -> pb.Reply:
        return _HEALTH_REPLY

    async def unary(self, rpc: str, request: Any, ctx: CallContext) -> Any:
        if rpc == "Health":
            return _HEALTH_REPLY
        if rpc == "Status":
            return await self.status_async()
        if rpc == "LoadModel":
            return await self.load_model(request, ctx)
        if rpc == "Free":
            return await self.free(ctx)
        fn = self._resolve(rpc)
        if rpc in UNGATED:
            return await self._call(fn, request, ctx, None)
        async with self._lease(rpc, request, ctx, streaming=False) as lease:
            return await self._call(fn, request, ctx, lease)

    async def stream(self, rpc: str, request: Any, ctx: CallContext) -> AsyncIterator[Any]:
        """Yield the replies of a server-streaming rpc; closing the iterator cancels it.

        A stream withdrawn by LoadModel/Free ends with ``Unavailable`` ("model is being
        unloaded"), whether the backend noticed ``ctx.cancelled()`` or not (``_lease``).
        """
        fn = self._resolve(rpc)
        if rpc in UNGATED:
            async for item in self._iterate(fn, request, ctx, None):
                yield item
            return
        async with self._lease(rpc, request, ctx, streaming=True) as lease:
            async for item in self._iterate(fn, request, ctx, lease):
                yield item

    async def _call(self, fn: Callable[..., Any], request: Any, ctx: CallContext, lease: Lease | None) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(request, ctx)
        return await self._run_blocking(ctx, fn, request, ctx, lease=lease)

    async def _iterate(self, fn: Callable[..., Any], request: Any, ctx: CallContext,
                       lease: Lease | None) -> AsyncIterator[Any]:
        if inspect.isasyncgenfunction(fn):
            agen = fn(request, ctx)
            try:
                async for item in agen:
                    if ctx.revoked:
                        return
                    yield item
            finally:
                ctx.cancel()
                await agen.aclose()
            return
        iterator = await self._run_blocking(ctx, fn, request, ctx, lease=lease)
        finished = False
        try:
            while not ctx.revoked:
                item = await self._run_blocking(ctx, next, iterator, _SENTINEL, lease=lease)
                if item is _SENTINEL:
                    finished = True
                    return
                yield item
        finally:
            if not finished:
                ctx.cancel()
                close = getattr(iterator, "close", None)
                if close is not None and not (lease is not None and lease.deferred):
                    # (a deferred lease: a worker is still inside next(); closing now would
                    # raise "generator already executing"; it ends on ctx.cancel() instead)
                    await self._run_blocking(ctx, close, lease=lease)

    # ---- lifecycle rpcs ---------------------------------------------------------
    def _state(self) -> int:
        state = self.backend.state()
        if self.gate.writing and state != pb.StatusResponse.ERROR:
            state = pb.StatusResponse.BUSY  # LoadModel/Free in progress
        return state

    async def status_async(self) -> pb.StatusResponse:
        """The Status rpc: the memory probes run off the event loop, bounded by ``PROBE_TIMEOUT_S``."""
        total, breakdown = await self._probe.memory()
        return pb.StatusResponse(state=self._state(), memory=pb.MemoryUsageData(total=total, breakdown=breakdown))

    def status(self) -> pb.StatusResponse:
        """Blocking form (NVML/torch probes run in the calling thread): not for the event loop."""
        total, breakdown = self.backend.memory()
        return pb.StatusResponse(state=self._state(), memory=pb.MemoryUsageData(total=total, breakdown=breakdown))

    async def load_model(self, options: pb.ModelOptions, ctx: CallContext) -> pb.Result:
        """Close the gate, drain, unload the old model, load the new one, reopen the gate.

        Bounded everywhere: waiting for another LoadModel/Free, the drain, and the load
        itself (``load_timeout``, or the call's deadline). A load that overruns keeps the
        gate closed until its worker ends, then its model is discarded; the caller gets
        ``Result(success=False)`` with the reason at the bound.
        """
        if not self._supported_load():
            raise Unsupported(self.backend.name, "LoadModel")
        writer = await self.gate.acquire_writer(LOADING, self._bound(ctx, self.load_timeout))
        try:
            await self.gate.drain(UNLOADING, self.drain_timeout)
            if self.backend.loaded:
                await self._writer_step(writer, ctx, "LoadModel (unloading the old model)", self.backend._free)
            try:
                message = await self._writer_step(writer, ctx, "LoadModel", self.backend.load, options, ctx,
                                                  discard_late=True)
            except InferdError as exc:
                return self._load_failed(exc.message)
            except Exception as exc:  # noqa: BLE001 - any load failure is reported, not raised
                log.exception("LoadModel failed")
                return self._load_failed(f"{type(exc).__name__}: {exc}")
            self.backend._mark_loaded(options.Model or options.ModelFile)
            self.expected_model_identity = None
        finally:
            writer.release()
        self._notify()
        return pb.Result(success=True, message=message or "model loaded")

    def _load_failed(self, reason: str) -> pb.Result:
        self.backend._mark_load_failed(reason)
        self._notify()
        return pb.Result(success=False, message=reason)

    async def free(self, ctx: CallContext) -> pb.Result:
        writer = await self.gate.acquire_writer(UNLOADING, self._bound(ctx, self.load_timeout))
        try:
            await self.gate.drain(UNLOADING, self.drain_timeout)
            was_loaded = await self._writer_step(writer, ctx, "Free", self.backend._free)
        finally:
            writer.release()
        self._notify()
        return pb.Result(success=True, message="model freed" if was_loaded else "no model was loaded")

    def _supported_load(self) -> bool:
        return type(self.backend).load is not Backend.load

    @staticmethod
    def _bound(ctx: CallContext, limit: float) -> float:
        remaining = ctx.time_remaining()
        return limit if remaining is None else min(limit, remaining)

    async def _writer_step(self, writer: Writer, ctx: CallContext, what: str, fn: Callable[..., Any],
                           *args: Any, discard_late: bool = False) -> Any:
        """Run a load/unload on a worker, bounded; an overrun keeps the gate closed until it ends.

        The worker cannot be killed, so at the bound (or if the caller goes away) the
        writer slot is handed to a background task that waits for the worker, frees a
        model that finished loading too late (``discard_late``) and only then reopens the
        gate: new calls meanwhile get UNAVAILABLE, never a half-loaded model.
        """
        loop = asyncio.get_running_loop()
        limit = self._bound(ctx, self.load_timeout)
        fut = loop.run_in_executor(self.executor, fn, *args)
        try:
            done, _ = await asyncio.wait({fut}, timeout=limit)
        except asyncio.CancelledError:
            self._abandon(writer, ctx, fut, what, discard_late)
            raise
        if done:
            return fut.result()
        self._abandon(writer, ctx, fut, what, discard_late)
        raise Unavailable(f"{what} did not finish within {limit:g}s; it is abandoned (new calls answer "
                          f"UNAVAILABLE until its worker ends{', then its model is discarded' if discard_late else ''})")

    def _abandon(self, writer: Writer, ctx: CallContext, fut: asyncio.Future, what: str, discard: bool) -> None:
        ctx.cancel()
        writer.deferred = True
        log.error("%s overran its bound or lost its caller; the gate stays closed until its worker ends", what)
        loop = asyncio.get_running_loop()

        async def finish() -> None:
            try:
                try:
                    await fut
                    loaded = True
                except BaseException:  # noqa: BLE001 - the caller was already answered
                    loaded = False
                if discard and loaded:
                    await loop.run_in_executor(self.executor, self.backend._free)
                    self.backend._mark_load_failed(f"{what} finished after its caller was answered; discarded")
            finally:
                writer.release(force=True)
                self._notify()
                log.info("%s: abandoned worker ended; gate reopened", what)

        task = loop.create_task(finish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @contextlib.asynccontextmanager
    async def model_call(self, name: str, ctx: CallContext, streaming: bool = True) -> AsyncIterator[Lease]:
        """Hold the lifecycle gate for work a front does on the engine directly.

        For fronts that bypass ``unary``/``stream`` (``LLMService.Generate`` on the text
        engine): the body runs like a model rpc, refused with UNAVAILABLE while LoadModel/
        Free run, withdrawn by them (poll ``ctx.cancelled()``; a withdrawn body ends with
        ``Unavailable``), and the model is not unloaded until the body has left.
        """
        async with self._lease(name, None, ctx, streaming) as lease:
            yield lease

    # ---- the calling rules ------------------------------------------------------
    def _resolve(self, rpc: str) -> Callable[..., Any]:
        reason = self.backend.explained_missing.get(rpc)
        if reason is not None:  # missing for a stated reason: say it, loaded or not
            raise Unsupported(self.backend.name, rpc, reason)
        if not self._supported[rpc]:
            raise Unsupported(self.backend.name, rpc)
        return getattr(self.backend, RPCS[rpc].method)

    def _check_model(self, rpc: str, request: Any, ctx: CallContext) -> None:
        info = RPCS.get(rpc)
        if info is not None and info.needs_model:
            if not self.backend.loaded and getattr(self.backend, "needs_model", True):
                raise NoModelLoaded(self.backend.name, rpc)
            self.check_identity(ctx.metadata.get(MODEL_IDENTITY_KEY), request)

    @contextlib.asynccontextmanager
    async def _lease(self, rpc: str, request: Any, ctx: CallContext, streaming: bool) -> AsyncIterator[Lease]:
        """Hold the gate (and the call lock of a non-parallel backend) for one model call.

        Also says why a call that ended early ended, in the caller's terms: withdrawn by
        LoadModel/Free -> ``Unavailable`` (a stream also when it ended "normally" after the
        withdrawal: its replies are cut short); stopped because its deadline passed ->
        ``DeadlineExceeded`` rather than ``Cancelled``.
        """
        lease = self.gate.enter(ctx, streaming)
        try:
            if not self.backend.parallel:
                lock = self.backend.call_lock
                await lock.acquire()
                lease.on_release(lock.release)
                if ctx.revoked:  # withdrawn while queued behind the lock
                    raise Unavailable(f"{rpc}: {ctx.revoked}")
            self._check_model(rpc, request, ctx)
            try:
                yield lease
            except Exception as exc:
                stopped = _why_stopped(rpc, ctx, exc)
                if stopped is exc:
                    raise
                raise stopped from exc
            if streaming and ctx.revoked:
                raise Unavailable(f"{rpc}: {ctx.revoked}")
        finally:
            if not lease.deferred:
                lease.release()

    def check_identity(self, claimed: str | None, request: Any = None) -> None:
        """LocalAI's model-identity check against the loaded model (``inferd.model_identity``)."""
        loaded = self.backend.model_name if self.backend.loaded else ""
        check_model_identity(self.backend.name, loaded, claimed, request)

    async def _run_blocking(self, ctx: CallContext, fn: Callable[..., Any], *args: Any,
                            lease: Lease | None = None) -> Any:
        """Run ``fn`` on a worker thread; on cancellation, stop it and wait for it (bounded)."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            ctx.cancel()
            if not await _wait_bounded(fut, CANCEL_WAIT_S):
                log.warning("%s: worker still running %.0fs after cancellation (%s)", ctx.rpc, CANCEL_WAIT_S,
                            "it keeps the call's gate lease and lock until it ends" if lease else "abandoned")
                if lease is not None:
                    lease.defer_until(fut)
                else:
                    fut.add_done_callback(consume_result)
            raise


def _why_stopped(rpc: str, ctx: CallContext, exc: Exception) -> Exception:
    if ctx.revoked:
        return Unavailable(f"{rpc}: {ctx.revoked}")
    if isinstance(exc, Cancelled) and ctx.deadline is not None and time.monotonic() >= ctx.deadline:
        return DeadlineExceeded(f"{rpc}: deadline exceeded")
    return exc


async def _wait_bounded(fut: asyncio.Future, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``fut``; repeated cancels (server shutdown) do not cut it short."""
    deadline = time.monotonic() + timeout
    while not fut.done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({fut}, timeout=remaining)
    return True
