"""Server interceptors: cross-cutting concerns registered once in ``server.app``.

Only authentication lives here. With no key configured the interceptor is not
installed at all, so an open server pays nothing per call.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable

import grpc

HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def extract_credential(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    """The credential a caller sent: ``authorization: Bearer TOKEN`` or ``x-api-key: KEY``.

    A raw token in ``authorization`` without the ``Bearer`` scheme, or an empty bearer,
    is not a credential (LocalAI's rule).
    """
    for key, value in metadata or ():
        if isinstance(value, bytes):
            continue
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token:
                return token.encode()
        elif key == "x-api-key" and value:
            return value.encode()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every rpc without a valid key with UNAUTHENTICATED (constant-time compare)."""

    def __init__(self, keys: Iterable[str], open_methods: Iterable[str] = ()) -> None:
        self._keys = tuple(k.encode() for k in keys if k)
        self._open = frozenset(open_methods)

    def _valid(self, credential: bytes | None) -> bool:
        if credential is None:
            return False
        ok = False
        for key in self._keys:  # compare with every key: timing does not reveal which matched
            ok |= hmac.compare_digest(credential, key)
        return ok

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method in self._open or self._valid(extract_credential(details.invocation_metadata)):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        return _refusal(handler, details.invocation_metadata)


def _refusal(handler: grpc.RpcMethodHandler, metadata: object) -> grpc.RpcMethodHandler:
    has_credential = extract_credential(metadata) is not None  # type: ignore[arg-type]
    message = (
        "invalid credentials"
        if has_credential
        else "missing credentials: send 'authorization: Bearer <key>' or 'x-api-key: <key>' metadata"
    )

    async def refuse_unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    deser, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, deser, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse_unary, deser, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, deser, ser)
    return grpc.unary_unary_rpc_method_handler(refuse_unary, deser, ser)
