"""Request decoding inside the handler, so undecodable bytes answer INVALID_ARGUMENT.

grpc's own wrapper deserializes before the handler runs; a ``DecodeError`` there ends
the call with UNKNOWN ("Unexpected DecodeError"), which tells the client nothing. Every
service inferd serves therefore registers its methods with an identity deserializer (the
handler receives the raw bytes) and parses them itself with ``decode``:
``backend.Backend`` and ``entity.grpc.LLMService`` in ``servicer``, the standard health
and reflection services through ``decoding_handlers`` below. Parsing costs the same as
before; it only moved.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from inferd.errors import InvalidArgument

#: Requests at least this large are parsed on a worker thread: parsing 33 MB of StoresSet keys
#: takes ~80 ms, which on the event loop would stall every stream and Health meanwhile.
LARGE_REQUEST_BYTES = 1 << 20


async def decode_async(cls: type[Message], raw: bytes) -> Any:
    """``decode``, off the event loop for large requests (small ones stay inline: a thread hop costs more)."""
    if len(raw) < LARGE_REQUEST_BYTES:
        return decode(cls, raw)
    return await asyncio.to_thread(decode, cls, raw)


def decode(cls: type[Message], raw: bytes) -> Any:
    """Parse ``raw`` as ``cls``; InvalidArgument naming the message type if it cannot be."""
    try:
        return cls.FromString(raw)
    except (DecodeError, RecursionError, ValueError, TypeError) as exc:
        raise InvalidArgument(
            f"request bytes ({len(raw)}) are not a valid {cls.DESCRIPTOR.full_name}: {exc or type(exc).__name__}"
        ) from None


class HandlerCollector:
    """Stands in for a server so generated ``add_*Servicer_to_server`` functions hand us their handlers."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []
        self.registered: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, method_handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.registered.append(grpc.method_handlers_generic_handler(service, method_handlers))

    @property
    def handlers(self) -> list[grpc.GenericRpcHandler]:
        # newer generated code registers the same methods both ways: keep one copy
        return self.generic or self.registered


class DecodingHandler(grpc.GenericRpcHandler):
    """Wraps another generic handler: same methods, requests parsed in the handler."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._cache: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method not in self._cache:
            handler = self._inner.service(details)
            self._cache[method] = None if handler is None else decoding_method_handler(handler)
        return self._cache[method]


def decoding_handlers(register: Callable[[Any], None]) -> list[grpc.GenericRpcHandler]:
    """Run a generated ``add_*Servicer_to_server``-style ``register(server)`` and wrap what it adds."""
    collector = HandlerCollector()
    register(collector)
    return [DecodingHandler(h) for h in collector.handlers]


def _message_class(deserializer: Callable[[bytes], Any] | None) -> type[Message] | None:
    cls = getattr(deserializer, "__self__", None)  # Message.FromString is a bound classmethod
    return cls if isinstance(cls, type) and issubclass(cls, Message) else None


def decoding_method_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same method with an identity deserializer and the parse moved into the behaviour."""
    cls = _message_class(handler.request_deserializer)
    if cls is None:
        return handler
    ser = handler.response_serializer

    async def parse(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return decode(cls, raw)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)

    async def parse_all(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for raw in requests:
            yield await parse(raw, context)

    if handler.request_streaming:
        # requests arrive as an iterator: parse each one as it is read
        def adapt(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            return parse_all(requests, context)
    else:
        async def adapt(raw: bytes, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
            return await parse(raw, context)

    if handler.response_streaming:
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream
        # grpc.aio tells an async-generator handler from a coroutine one by its function
        # type, so the wrapper must be of the same kind as the behaviour it wraps.
        if inspect.isasyncgenfunction(inner):
            async def streaming_gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for reply in inner(await _maybe_await(adapt(request, context)), context):
                    yield reply
            behaviour: Any = streaming_gen
        else:
            async def streaming_coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
                # writes with context.write() (grpc.aio's reader/writer style)
                return await _maybe_await(inner(await _maybe_await(adapt(request, context)), context))
            behaviour = streaming_coro
        factory = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                   else grpc.unary_stream_rpc_method_handler)
        return factory(behaviour, None, ser)
    if handler.request_streaming:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            return await _maybe_await(inner_su(parse_all(requests, context), context))

        return grpc.stream_unary_rpc_method_handler(stream_unary, None, ser)
    inner_uu = handler.unary_unary

    async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await _maybe_await(inner_uu(await parse(raw, context), context))

    return grpc.unary_unary_rpc_method_handler(unary_unary, None, ser)


async def _maybe_await(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result
