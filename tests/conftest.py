"""Shared fixtures. Servers bind 127.0.0.1 on free ports; nothing leaves loopback."""

from __future__ import annotations

import pytest

from tests.fixtures_backend import EchoBackend
from tests.helpers import running_server


@pytest.fixture
def echo_backend() -> EchoBackend:
    return EchoBackend()


@pytest.fixture
async def echo_server(echo_backend: EchoBackend):
    """A real networked server around a fresh EchoBackend (no model loaded)."""
    async with running_server(echo_backend) as server:
        yield server


@pytest.fixture(params=["grpc", "embedded"])
async def echo_client(request, echo_backend: EchoBackend):
    """The same client interface over the network and in-process (seed 000's embedded mode)."""
    from inferd.client import new_client, provide, unprovide

    if request.param == "grpc":
        async with running_server(echo_backend) as server:
            client = new_client(f"127.0.0.1:{server.port}", parallel=True)
            yield client
            await client.close()
    else:
        address = f"embedded-{id(echo_backend)}"
        provide(address, echo_backend)
        client = new_client(address, parallel=True)
        yield client
        await client.close()
        unprovide(address)
