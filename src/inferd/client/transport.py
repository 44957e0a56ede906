"""Transports carry one rpc: over a gRPC channel, or straight into an in-process runtime.

Both raise ``RpcError`` with the same codes, so ``Client`` and its users cannot tell
an embedded backend from a networked one (seed 000's ``embedBackend``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from inferd.backends.context import CallContext
from inferd.client.errors import RpcError
from inferd.protocol import Rpc
from inferd.runtime import BackendRuntime
from inferd.server.status_map import to_status

MiB = 1024 * 1024


#: Extra metadata for one call (a correlation id, a model identity), added to the channel's.
Metadata = Sequence[tuple[str, str]]


class Transport(Protocol):
    async def unary(self, rpc: Rpc, request: Any, timeout: float | None, metadata: Metadata = ()) -> Any: ...
    def stream(self, rpc: Rpc, request: Any, timeout: float | None,
               metadata: Metadata = ()) -> AsyncIterator[Any]: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class ChannelOptions:
    """How to reach a networked backend: credentials, TLS and limits."""

    api_key: str = ""  # sent as 'authorization: Bearer KEY' (LocalAI's token or GRPC_API_KEY)
    tls: bool = False
    ca_file: str = ""  # trust this CA (self-signed servers); default: system roots
    cert_file: str = ""  # client certificate for mTLS
    key_file: str = ""
    server_name: str = ""  # override the TLS name checked against the certificate
    max_message_size: int = 50 * MiB  # LocalAI's client limit
    metadata: tuple[tuple[str, str], ...] = ()  # extra metadata on every call


class GrpcTransport:
    """Calls a backend over a grpc.aio channel."""

    def __init__(self, address: str, options: ChannelOptions | None = None) -> None:
        self.address = address
        self.options = options or ChannelOptions()
        o = self.options
        channel_opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", o.max_message_size),
            ("grpc.max_send_message_length", o.max_message_size),
        ]
        if o.tls:
            read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
            creds = grpc.ssl_channel_credentials(read(o.ca_file), read(o.key_file), read(o.cert_file))
            if o.server_name:
                channel_opts.append(("grpc.ssl_target_name_override", o.server_name))
            self.channel = grpc.aio.secure_channel(address, creds, options=channel_opts)
        else:
            self.channel = grpc.aio.insecure_channel(address, options=channel_opts)
        md: list[tuple[str, str]] = list(o.metadata)
        if o.api_key:
            md.append(("authorization", f"Bearer {o.api_key}"))
        self._metadata: Sequence[tuple[str, str]] | None = tuple(md) or None
        self._calls: dict[str, Any] = {}

    def _callable(self, rpc: Rpc) -> Any:
        call = self._calls.get(rpc.path)
        if call is None:
            factory = self.channel.unary_stream if rpc.streaming else self.channel.unary_unary
            call = factory(rpc.path, rpc.request.SerializeToString, rpc.response.FromString)
            self._calls[rpc.path] = call
        return call

    def _md(self, extra: Metadata) -> Sequence[tuple[str, str]] | None:
        return (*(self._metadata or ()), *extra) if extra else self._metadata

    async def unary(self, rpc: Rpc, request: Any, timeout: float | None, metadata: Metadata = ()) -> Any:
        try:
            return await self._callable(rpc)(request, timeout=timeout, metadata=self._md(metadata))
        except grpc.aio.AioRpcError as exc:
            raise RpcError.from_grpc(exc, rpc.name) from None

    async def stream(self, rpc: Rpc, request: Any, timeout: float | None,
                     metadata: Metadata = ()) -> AsyncIterator[Any]:
        call = self._callable(rpc)(request, timeout=timeout, metadata=self._md(metadata))
        try:
            async for reply in call:
                yield reply
        except grpc.aio.AioRpcError as exc:
            raise RpcError.from_grpc(exc, rpc.name) from None
        finally:
            call.cancel()  # no-op when finished; stops the server's work when abandoned

    async def close(self) -> None:
        await self.channel.close()


class EmbeddedTransport:
    """Calls an in-process ``BackendRuntime`` directly: no sockets, same semantics."""

    def __init__(self, runtime: BackendRuntime, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.runtime = runtime
        self._metadata = dict(metadata)

    def _ctx(self, rpc: Rpc, timeout: float | None, metadata: Metadata = ()) -> CallContext:
        deadline = time.monotonic() + timeout if timeout is not None else None
        md = {**self._metadata, **dict(metadata)} if metadata else self._metadata
        return CallContext(rpc.name, metadata=md, deadline=deadline)

    async def unary(self, rpc: Rpc, request: Any, timeout: float | None, metadata: Metadata = ()) -> Any:
        ctx = self._ctx(rpc, timeout, metadata)
        try:
            return await asyncio.wait_for(self.runtime.unary(rpc.name, request, ctx), timeout)
        except asyncio.TimeoutError:
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", rpc.name) from None
        except Exception as exc:  # noqa: BLE001 - same mapping as the server
            code, message = to_status(exc, rpc.name)
            raise RpcError(code, message, rpc.name) from None

    async def stream(self, rpc: Rpc, request: Any, timeout: float | None,
                     metadata: Metadata = ()) -> AsyncIterator[Any]:
        ctx = self._ctx(rpc, timeout, metadata)
        agen = self.runtime.stream(rpc.name, request, ctx)
        try:
            while True:
                remaining = ctx.time_remaining()
                if remaining == 0.0:
                    raise asyncio.TimeoutError
                try:
                    reply = await asyncio.wait_for(agen.__anext__(), remaining)
                except StopAsyncIteration:
                    return
                yield reply
        except asyncio.TimeoutError:
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", rpc.name) from None
        except RpcError:
            raise
        except Exception as exc:  # noqa: BLE001
            code, message = to_status(exc, rpc.name)
            raise RpcError(code, message, rpc.name) from None
        finally:
            await agen.aclose()

    async def close(self) -> None:
        return None
