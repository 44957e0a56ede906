"""The OpenAI-compatible HTTP front as a Ray Serve HTTP ingress (``inferd ray deploy --openai``).

The same FastAPI app as ``inferd up --http`` (``inferd.http.app.create_app``), built in a Ray
replica (Serve's ``__serve_build_asgi_app__`` hook). Its ``ModelSource`` is ``RaySource``: one
client per model, dialling the node-local Ray gRPC proxy with that model's ``application``
metadata and the retry policy, so a request crosses exactly the path any gRPC client takes
(HTTP proxy -> front replica -> gRPC proxy -> model replica): one more hop than calling a
model deployment's handle, but no second translation of the protocol to maintain.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inferd.client import ChannelOptions, Client, RetryPolicy, new_client
from inferd.http.source import AddressSource, unknown_model


class RaySource(AddressSource):
    """Every model at the Ray gRPC proxy's address, told apart by the ``application`` metadata."""

    def __init__(self, grpc_address: str, backends: Mapping[str, str]) -> None:
        super().__init__({name: grpc_address for name in backends}, backends)

    async def client(self, name: str) -> Client:
        address = self.addresses.get(name)
        if address is None:
            raise unknown_model(name, list(self.addresses))
        options = ChannelOptions(metadata=(("application", name),))
        return self._cache.get(name, address,
                               lambda addr: new_client(addr, parallel=True, options=options, retry=RetryPolicy()))


class HttpFront:
    """The Ray deployment class (wrapped with ``serve.ingress()`` by ``inferd.scale.app``)."""

    def __init__(self, grpc_address: str, backends: Mapping[str, str], api_keys: tuple[str, ...] = ()) -> None:
        self.source = RaySource(grpc_address, backends)
        self.api_keys = api_keys

    def __serve_build_asgi_app__(self) -> Any:
        from inferd.http.app import create_app

        return create_app(self.source, self.api_keys)
