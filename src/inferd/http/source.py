"""Where the HTTP front gets a backend client for a model name.

The front is a translator: it never holds a model itself. ``ModelSource`` is the one
thing it needs from whoever runs the backends: the model names it may serve and an
async ``Client`` for one of them, started on demand. ``ManagerSource`` answers from
the supervisor (``inferd up --http``); ``AddressSource`` from fixed addresses (a
backend someone else runs, benchmarks).

Clients are reused by every request, so a request costs one gRPC call, not a new
channel: the supervisor keeps one per running backend (and a new one after a
restart); ``AddressSource`` caches its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from inferd.client import ChannelOptions, Client, new_client
from inferd.http.errors import APIError


@dataclass(frozen=True)
class ModelInfo:
    """What ``GET /v1/models`` says about a model."""

    name: str
    backend: str
    created: int = 0


class ModelSource(Protocol):
    def models(self) -> list[ModelInfo]: ...
    async def client(self, name: str) -> Client: ...
    async def close(self) -> None: ...


def unknown_model(name: str, known: list[str]) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; served models: {', '.join(known) or 'none'}",
                    "invalid_request_error", "model", "model_not_found")


class _ClientCache:
    """One async client per (model, address), retired when the address changes."""

    def __init__(self) -> None:
        self._clients: dict[str, Client] = {}
        self._retired: set[asyncio.Task[Any]] = set()

    def get(self, name: str, address: str, make: Any) -> Client:
        client = self._clients.get(name)
        if client is not None and client.address == address:
            return client
        if client is not None:
            self._retire(client)
        client = make(address)
        self._clients[name] = client
        return client

    def _retire(self, client: Client) -> None:
        async def close_when_idle() -> None:
            for _ in range(600):  # in-flight calls on the old address finish (or fail) first
                if not client.is_busy():
                    break
                await asyncio.sleep(0.05)
            with contextlib.suppress(Exception):
                await client.close()

        task = asyncio.get_running_loop().create_task(close_when_idle())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()


class ManagerSource:
    """Models of an ``AsyncModelManager`` running in this loop; asking for a stopped one starts it.

    The manager caches one client per running backend, so nothing is cached here.
    """

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(s.name, s.backend) for s in self.manager.config.models]

    async def client(self, name: str) -> Client:
        from inferd.supervisor.async_manager import ModelError

        if name not in self.manager.names:
            raise unknown_model(name, self.manager.names)
        try:
            return await self.manager.client(name)
        except ModelError as exc:
            raise APIError(503, f"model {name!r} is unavailable: {str(exc).splitlines()[0]}",
                           "service_unavailable", "model", "model_unavailable") from None

    async def close(self) -> None:
        return None


class AddressSource:
    """Fixed ``name -> address`` backends that someone else runs."""

    def __init__(self, addresses: Mapping[str, str], backends: Mapping[str, str] | None = None,
                 options: ChannelOptions | None = None, parallel: bool = True) -> None:
        self.addresses = dict(addresses)
        self.backends = dict(backends or {})
        self.options = options
        self.parallel = parallel
        self._cache = _ClientCache()

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(n, self.backends.get(n, "")) for n in self.addresses]

    async def client(self, name: str) -> Client:
        address = self.addresses.get(name)
        if address is None:
            raise unknown_model(name, list(self.addresses))
        return self._cache.get(name, address,
                               lambda addr: new_client(addr, parallel=self.parallel, options=self.options))

    async def close(self) -> None:
        await self._cache.close()
