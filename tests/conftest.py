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
