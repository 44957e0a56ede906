"""The async client (seed 000's ``Client``) and its sync facade.

Every rpc of the contract is a method named in snake_case (``predict``,
``predict_stream``, ``stores_find`` ...). A method takes the request message, or its
fields as keyword arguments, plus ``timeout=`` (a per-call deadline in seconds);
streaming rpcs return async iterators. Errors are ``RpcError`` with the status code.

Busy tracking follows LocalAI: a client made with ``parallel=False`` serializes its
own model calls, ``is_busy()`` is true while one is in flight, and a watchdog (if
given) is told ``mark(address)``/``unmark(address)`` around each model call so it
can kill a backend stuck on one call. Health/Status/GetMetrics neither wait nor mark.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import grpc

from inferd.client.errors import RpcError
from inferd.client.retry import RetryPolicy, stream_with_retry, unary_with_retry
from inferd.client.transport import Metadata, Transport
from inferd.proto import backend_pb2 as pb
from inferd.protocol import RPCS, Rpc
from inferd.runtime import UNGATED


class WatchdogHooks(Protocol):
    """What the client tells a watchdog (LocalAI's ``WatchDog.Mark``/``UnMark``)."""

    def mark(self, address: str) -> None: ...
    def unmark(self, address: str) -> None: ...


class Client:
    """Async client over any ``Transport``. Build one with ``inferd.client.new_client``."""

    def __init__(
        self,
        transport: Transport,
        address: str,
        parallel: bool = False,
        watchdog: WatchdogHooks | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.transport = transport
        self.address = address
        self.parallel = parallel
        self.watchdog = watchdog
        self.retry = retry  # inferd.client.retry: UNAVAILABLE on idempotent calls (None: no retries)
        self._op_lock = asyncio.Lock()
        self._busy = 0
        self._busy_guard = threading.Lock()

    # ---- busy marks ---------------------------------------------------------------
    def is_busy(self) -> bool:
        return self._busy > 0

    def _set_busy(self, delta: int) -> None:
        with self._busy_guard:
            self._busy += delta
        if self.watchdog is not None:
            (self.watchdog.mark if delta > 0 else self.watchdog.unmark)(self.address)

    # ---- generic call paths -------------------------------------------------------
    async def call(self, rpc_name: str, request: Any = None, timeout: float | None = None,
                   metadata: Metadata = (), **fields: Any) -> Any:
        """Call a unary rpc by its wire name (``"Predict"``); ``metadata`` is added to this call only."""
        rpc = RPCS[rpc_name]
        request = _request(rpc, request, fields)
        if rpc.name in UNGATED:
            return await self._unary(rpc, request, timeout, metadata)
        if self.parallel:
            return await self._marked_unary(rpc, request, timeout, metadata)
        async with self._op_lock:
            return await self._marked_unary(rpc, request, timeout, metadata)

    async def _marked_unary(self, rpc: Rpc, request: Any, timeout: float | None, metadata: Metadata) -> Any:
        self._set_busy(1)
        try:
            return await self._unary(rpc, request, timeout, metadata)
        finally:
            self._set_busy(-1)

    async def _unary(self, rpc: Rpc, request: Any, timeout: float | None, metadata: Metadata) -> Any:
        if self.retry is None:
            return await self.transport.unary(rpc, request, timeout, metadata)
        return await unary_with_retry(self.retry, rpc.name, timeout,
                                      lambda left: self.transport.unary(rpc, request, left, metadata))

    def _stream(self, rpc: Rpc, request: Any, timeout: float | None, metadata: Metadata) -> AsyncIterator[Any]:
        if self.retry is None:
            return self.transport.stream(rpc, request, timeout, metadata)
        return stream_with_retry(self.retry, rpc.name, timeout,
                                 lambda left: self.transport.stream(rpc, request, left, metadata))

    async def call_stream(
        self, rpc_name: str, request: Any = None, timeout: float | None = None, metadata: Metadata = (),
        **fields: Any,
    ) -> AsyncIterator[Any]:
        """Iterate the replies of a streaming rpc by its wire name (``"PredictStream"``)."""
        rpc = RPCS[rpc_name]
        request = _request(rpc, request, fields)
        gated = rpc.name not in UNGATED
        lock = self._op_lock if (gated and not self.parallel) else None
        if lock is not None:
            await lock.acquire()
        if gated:
            self._set_busy(1)
        stream = self._stream(rpc, request, timeout, metadata)
        try:
            async for reply in stream:
                yield reply
        finally:
            await stream.aclose()
            if gated:
                self._set_busy(-1)
            if lock is not None:
                lock.release()

    # ---- conveniences -------------------------------------------------------------
    async def health_check(self, timeout: float = 5.0) -> bool:
        """True when the backend answers Health with ``OK`` within ``timeout`` seconds."""
        try:
            reply = await self.call("Health", timeout=timeout)
        except RpcError:
            return False
        return reply.message == b"OK"

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _request(rpc: Rpc, request: Any, fields: dict[str, Any]) -> Any:
    if request is None:
        return rpc.request(**fields)
    if fields:
        raise TypeError(f"{rpc.method}(): pass a {rpc.request.__name__} or keyword fields, not both")
    if not isinstance(request, rpc.request):
        raise TypeError(f"{rpc.method}(): expected {rpc.request.__name__}, got {type(request).__name__}")
    return request


def _install_rpc_methods() -> None:
    """Give ``Client`` one method per rpc, named ``Rpc.method``."""

    def make(rpc: Rpc) -> Callable[..., Any]:
        if rpc.streaming:
            def stream_method(self: Client, request: Any = None, timeout: float | None = None, **fields: Any):  # type: ignore[no-untyped-def]
                return self.call_stream(rpc.name, request, timeout, **fields)
            method = stream_method
        else:
            async def unary_method(self: Client, request: Any = None, timeout: float | None = None, **fields: Any):  # type: ignore[no-untyped-def]
                return await self.call(rpc.name, request, timeout, **fields)
            method = unary_method
        method.__name__ = rpc.method
        kind = "async iterator of" if rpc.streaming else "awaitable"
        method.__doc__ = (
            f"``{rpc.name}``: {rpc.request.__name__} -> {kind} {rpc.response.__name__}."
        )
        return method

    for rpc in RPCS.values():
        if not hasattr(Client, rpc.method):
            setattr(Client, rpc.method, make(rpc))


_install_rpc_methods()


class SyncClient:
    """Blocking facade over ``Client``: same methods, streams as plain iterators.

    Runs a private event loop on a daemon thread, so it can be used from code that
    has no event loop (scripts, the CLI, Go-style callers).
    """

    def __init__(self, factory: Callable[[], Client], loop: asyncio.AbstractEventLoop | None = None) -> None:
        # With ``loop`` (already running on another thread, e.g. the supervisor's) the client
        # shares it instead of starting a thread of its own; close() then leaves it running.
        self._owns_loop = loop is None
        self._loop = loop or asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        if self._owns_loop:
            self._thread = threading.Thread(target=self._loop.run_forever, name="inferd-client", daemon=True)
            self._thread.start()
        self._client: Client = self._run(_build(factory))

    def _run(self, coro: Any) -> Any:
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        except concurrent.futures.CancelledError:
            # close() from another thread stopped the loop under this call
            raise RpcError(grpc.StatusCode.CANCELLED, "client closed while the call was in flight") from None

    @property
    def address(self) -> str:
        return self._client.address

    def is_busy(self) -> bool:
        return self._client.is_busy()

    def health_check(self, timeout: float = 5.0) -> bool:
        return self._run(self._client.health_check(timeout))

    def call(self, rpc_name: str, request: Any = None, timeout: float | None = None, **fields: Any) -> Any:
        return self._run(self._client.call(rpc_name, request, timeout, **fields))

    def call_stream(
        self, rpc_name: str, request: Any = None, timeout: float | None = None, **fields: Any
    ) -> Iterator[Any]:
        agen = self._client.call_stream(rpc_name, request, timeout, **fields)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())

    def close(self, timeout: float = 5.0) -> None:
        """Close the channel and stop the private loop. Never raises: a loop thread that is
        slow to stop (a call still unwinding) is left to finish on its own as a daemon."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(timeout)
        if not self._owns_loop:
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                return  # still stopping: closing a running loop would raise
        with contextlib.suppress(RuntimeError):
            self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        for rpc in RPCS.values():
            if rpc.method == name:
                if rpc.streaming:
                    return lambda request=None, timeout=None, **f: self.call_stream(rpc.name, request, timeout, **f)
                return lambda request=None, timeout=None, **f: self.call(rpc.name, request, timeout, **f)
        raise AttributeError(name)


async def _build(factory: Callable[[], Client]) -> Client:
    return factory()  # channels must be created on the loop that will use them


__all__ = ["Client", "SyncClient", "WatchdogHooks", "RpcError", "grpc", "pb"]
