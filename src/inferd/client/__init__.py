"""Clients for inferd (and any LocalAI-protocol) backends, networked or embedded.

``new_client(address)`` returns an async ``Client``: if a backend was registered for
that address with ``provide(address, backend)`` the client calls it in-process (no
network, same semantics and error codes); otherwise it dials the address over gRPC.
``new_sync_client`` is the same with blocking methods. ``client_from_config(path)``
reads seed 002's Go client ``config.yaml`` (``use_grpc``, ``grpc_address``,
``use_secure_connection``, ``api_key``).
"""

from __future__ import annotations

import threading
from typing import Any

from inferd.backends.base import Backend
from inferd.client.client import Client, SyncClient, WatchdogHooks
from inferd.client.config import (
    ClientConfigError,
    client_from_config,
    load_client_config,
    sync_client_from_config,
)
from inferd.client.errors import RpcError
from inferd.client.retry import RetryPolicy
from inferd.client.transport import ChannelOptions, EmbeddedTransport, GrpcTransport
from inferd.runtime import BackendRuntime

_embeds: dict[str, BackendRuntime] = {}
_embeds_lock = threading.Lock()


def provide(address: str, backend: Backend | BackendRuntime, max_workers: int = 4) -> BackendRuntime:
    """Register an in-process backend under ``address`` (seed 000's ``Provide``)."""
    runtime = backend if isinstance(backend, BackendRuntime) else BackendRuntime(backend, max_workers)
    with _embeds_lock:
        _embeds[address] = runtime
    return runtime


def unprovide(address: str) -> None:
    with _embeds_lock:
        runtime = _embeds.pop(address, None)
    if runtime is not None:
        runtime.shutdown()


def new_client(
    address: str,
    parallel: bool = False,
    watchdog: WatchdogHooks | None = None,
    enable_watchdog: bool = True,
    options: ChannelOptions | None = None,
    retry: RetryPolicy | None = None,
    **option_fields: Any,
) -> Client:
    """A client for ``address``: embedded if provided in-process, else over gRPC.

    ``retry``: retry UNAVAILABLE on idempotent calls (``inferd.client.retry``); None: never.
    """
    if option_fields:
        options = ChannelOptions(**{**(options.__dict__ if options else {}), **option_fields})
    wd = watchdog if enable_watchdog else None
    with _embeds_lock:
        runtime = _embeds.get(address)
    if runtime is not None:
        md = options.metadata if options else ()
        return Client(EmbeddedTransport(runtime, md), address, parallel, wd, retry)
    return Client(GrpcTransport(address, options), address, parallel, wd, retry)


def new_sync_client(address: str, **kwargs: Any) -> SyncClient:
    return SyncClient(lambda: new_client(address, **kwargs))


__all__ = [
    "ChannelOptions",
    "Client",
    "ClientConfigError",
    "RetryPolicy",
    "RpcError",
    "SyncClient",
    "WatchdogHooks",
    "client_from_config",
    "load_client_config",
    "new_client",
    "new_sync_client",
    "provide",
    "sync_client_from_config",
    "unprovide",
]
