"""The blocking facade of the model manager, for the CLI, scripts and tests.

``ModelManager(config)`` runs an ``AsyncModelManager`` (the real one, see
``inferd.supervisor.async_manager``) on a private event-loop thread and offers the same
operations as plain calls: ``client(name)`` returns a ``SyncClient`` that shares that
loop (no thread per client), ``ensure``/``stop``/``kill``/``ps`` wait for the loop.
``ModelManager.attach(manager, loop)`` wraps a manager that already runs in another
thread's loop (``inferd up``: the HTTP front and the manager share one loop; the
control endpoint's threads use this facade).

Hold ``manager.model(name)`` (a proxy that goes through the manager on every call)
rather than a raw client when a backend may be restarted: a raw client keeps the
address of the process it was made for.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc

from inferd.client import Client, RpcError, SyncClient, new_client
from inferd.supervisor.async_manager import AsyncModelManager, ModelError
from inferd.supervisor.config import SupervisorConfig

T = TypeVar("T")

__all__ = ["AsyncModelManager", "ModelError", "ModelManager", "ModelProxy"]


class ModelManager:
    """Blocking operations on an ``AsyncModelManager`` running in a loop thread."""

    def __init__(self, config: SupervisorConfig, memory_probe: Callable[[], float] | None = None) -> None:
        self._owns_loop = True
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = threading.Thread(
            target=self._loop.run_forever, name="inferd-supervisor", daemon=True)
        self._thread.start()
        try:
            self.inner = self._call(_build(config, memory_probe))
        except BaseException:
            self._stop_loop()
            raise
        self._init_common()
        # Children must not outlive us: stop them at interpreter exit. (A kill -9 of
        # this process is covered by the children's parent-death watch.)
        ref = weakref.ref(self)
        self._atexit = lambda: (m := ref()) is not None and m.close()
        atexit.register(self._atexit)

    @classmethod
    def attach(cls, inner: AsyncModelManager, loop: asyncio.AbstractEventLoop) -> ModelManager:
        """A facade over a manager already running in ``loop`` (owned by someone else)."""
        self = cls.__new__(cls)
        self._owns_loop = False
        self._loop = loop
        self._thread = None
        self.inner = inner
        self._init_common()
        self._atexit = None
        return self

    def _init_common(self) -> None:
        self._sync_clients: dict[str, tuple[Client, SyncClient]] = {}
        self._guard = threading.Lock()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("ModelManager's blocking methods cannot run on its own loop; use .inner")
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)
        except concurrent.futures.CancelledError:
            raise ModelError("the model manager stopped while the call was in flight") from None

    # ---- the managed models ----------------------------------------------------------
    @property
    def config(self) -> SupervisorConfig:
        return self.inner.config

    @property
    def names(self) -> list[str]:
        return self.inner.names

    @property
    def watchdog(self) -> Any:
        return self.inner.watchdog

    @property
    def run_dir(self) -> Any:
        return self.inner.run_dir

    @property
    def log_dir(self) -> Any:
        return self.inner.log_dir

    def ensure(self, name: str) -> str:
        """Start ``name`` if it is not running (restart if it died); return its address."""
        self.inner._slot(name)  # KeyError for unknown names, raised here rather than in the loop
        return self._call(self.inner.ensure(name))

    async def aensure(self, name: str) -> str:
        """``ensure`` for a caller in another event loop."""
        self.inner._slot(name)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.inner.ensure(name), self._loop))

    def client(self, name: str) -> SyncClient:
        """A blocking client for ``name``'s running backend (started on demand), on the manager's loop."""
        self.inner._slot(name)
        inner_client = self._call(self.inner.client(name))
        with self._guard:
            cached = self._sync_clients.get(name)
            if cached is not None and cached[0] is inner_client:
                return cached[1]
            sync = SyncClient(lambda: inner_client, loop=self._loop)
            self._sync_clients[name] = (inner_client, sync)
            return sync

    async def aclient(self, name: str) -> Client:
        """An async client (``inferd.client.new_client``) in the caller's event loop; the caller closes it."""
        address = await self.aensure(name)
        spec = self.inner.spec(name)
        return new_client(address, parallel=spec.parallel, watchdog=self.watchdog,
                          options=self.inner.channel_options(name))

    def model(self, name: str) -> ModelProxy:
        """A proxy with the client's methods that survives restarts of the backend."""
        self.inner._slot(name)
        return ModelProxy(self, name)

    def address(self, name: str) -> str | None:
        return self.inner.address(name)

    def channel_options(self, name: str) -> Any:
        return self.inner.channel_options(name)

    def stop(self, name: str, reason: str = "stop requested") -> bool:
        """Stop ``name`` gracefully (SIGTERM, then SIGKILL after ``stop_grace``)."""
        self.inner._slot(name)
        return self._call(self.inner.stop(name, reason))

    def kill(self, name: str, reason: str) -> bool:
        """Kill ``name`` now (a stuck call); the next request restarts it."""
        self.inner._slot(name)
        return self._call(self.inner.kill(name, reason))

    def start_all(self, limit: int | None = None) -> dict[str, str]:
        return self._call(self.inner.start_all(limit))

    def ps(self, status_timeout: float = 1.0) -> list[dict[str, Any]]:
        """One row per configured model: state, pid, address, memory, busy/idle time."""
        return self._call(self.inner.ps(status_timeout))

    def _settle(self, name: str, wait: float = 0.5) -> None:
        self._call(self.inner.settle(name, wait))

    # ---- life cycle --------------------------------------------------------------------
    def close(self) -> None:
        """Stop every backend and, when it owns it, the loop thread. Idempotent."""
        if self._loop.is_closed():
            return
        if not self.inner.closed:
            with contextlib.suppress(Exception):
                self._call(self.inner.close(), timeout=self.config.stop_grace + 15)
        if self._atexit is not None:
            with contextlib.suppress(Exception):
                atexit.unregister(self._atexit)
        if self._owns_loop:
            self._stop_loop()

    def _stop_loop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                return
        with contextlib.suppress(RuntimeError):
            self._loop.close()

    def __enter__(self) -> ModelManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _build(config: SupervisorConfig, memory_probe: Callable[[], float] | None) -> AsyncModelManager:
    manager = AsyncModelManager(config, memory_probe)  # its locks and tasks belong to this loop
    await manager.start()
    return manager


class ModelProxy:
    """Calls ``manager.client(name).METHOD(...)``: each call finds the live backend."""

    def __init__(self, manager: ModelManager, name: str) -> None:
        self._manager = manager
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def __getattr__(self, attr: str) -> Callable[..., Any]:
        if attr.startswith("_"):
            raise AttributeError(attr)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                result = getattr(self._manager.client(self._name), attr)(*args, **kwargs)
            except RpcError as exc:
                if exc.code == grpc.StatusCode.UNAVAILABLE:
                    self._manager._settle(self._name)
                raise
            if isinstance(result, Iterator) and not isinstance(result, (str, bytes)):
                return self._watch_stream(result)
            return result

        call.__name__ = attr
        return call

    def _watch_stream(self, stream: Iterator[Any]) -> Iterator[Any]:
        """A stream's UNAVAILABLE surfaces while iterating: settle then too, so the next call restarts."""
        try:
            yield from stream
        except RpcError as exc:
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                self._manager._settle(self._name)
            raise
