"""The servicers: translate gRPC calls into runtime calls and errors into statuses.

There is no per-rpc code here: every method of ``backend.Backend`` is bound from the
RPC table to ``BackendRuntime.unary``/``stream``. A handler parses the request bytes
itself (``decoding.decode``: bad bytes are INVALID_ARGUMENT naming the message type, not
grpc's UNKNOWN), builds a ``CallContext`` (metadata, deadline), awaits the runtime, and on
an exception aborts with the status from ``status_map`` — the one place that happens.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from inferd.backends.context import CallContext
from inferd.errors import InvalidArgument, NoModelLoaded, Unsupported
from inferd.proto import backend_pb2 as pb
from inferd.proto import llm_pb2
from inferd.protocol import LLM_RPCS, LLM_SERVICE_NAME, RPCS, SERVICE_NAME, Rpc
from inferd.runtime import MODEL_IDENTITY_KEY, BackendRuntime
from inferd.server.decoding import decode, decode_async
from inferd.server.status_map import to_status

__all__ = ["MODEL_IDENTITY_KEY", "BackendServicer", "LLMServicer"]


def _call_context(rpc: str, context: grpc.aio.ServicerContext) -> CallContext:
    remaining = context.time_remaining()
    deadline = time.monotonic() + remaining if remaining is not None else None
    metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    return CallContext(rpc, metadata=metadata, deadline=deadline)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, rpc: str) -> None:
    code, message = to_status(exc, rpc)
    await context.abort(code, message)


class BackendServicer:
    """Binds every rpc of ``backend.Backend`` to a ``BackendRuntime``."""

    def __init__(self, runtime: BackendRuntime) -> None:
        self.runtime = runtime

    def generic_handler(self) -> grpc.GenericRpcHandler:
        # request_deserializer None: the handler gets the raw bytes and parses them itself,
        # so undecodable bytes answer INVALID_ARGUMENT naming the type (server.decoding).
        handlers = {}
        for rpc in RPCS.values():
            if rpc.name == "Health":
                handlers[rpc.name] = grpc.unary_unary_rpc_method_handler(
                    self._health, None, rpc.response.SerializeToString
                )
            elif rpc.streaming:
                handlers[rpc.name] = grpc.unary_stream_rpc_method_handler(
                    self._stream_handler(rpc), None, rpc.response.SerializeToString
                )
            else:
                handlers[rpc.name] = grpc.unary_unary_rpc_method_handler(
                    self._unary_handler(rpc), None, rpc.response.SerializeToString
                )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    async def _health(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.Reply:
        # The hot path: no context, no lock. HealthMessage has no fields, so only
        # non-empty bytes need parsing (and must parse).
        if raw:
            try:
                decode(pb.HealthMessage, raw)
            except InvalidArgument as exc:
                await _abort(context, exc, "Health")
        return self.runtime.health()

    def _unary_handler(self, rpc: Rpc) -> Any:
        runtime = self.runtime
        name = rpc.name
        request_cls = rpc.request

        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                request = await decode_async(request_cls, raw)
                return await runtime.unary(name, request, _call_context(name, context))
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never crashes the server
                await _abort(context, exc, name)

        handler.__name__ = rpc.method
        return handler

    def _stream_handler(self, rpc: Rpc) -> Any:
        runtime = self.runtime
        name = rpc.name
        request_cls = rpc.request

        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                request = await decode_async(request_cls, raw)
            except InvalidArgument as exc:
                await _abort(context, exc, name)
            stream = runtime.stream(name, request, _call_context(name, context))
            try:
                async for reply in stream:
                    yield reply
            except Exception as exc:  # noqa: BLE001
                await _abort(context, exc, name)
            finally:
                await stream.aclose()

        handler.__name__ = rpc.method
        return handler


class LLMServicer:
    """Seed 003's ``entity.grpc.LLMService.Generate``: a prompt in, tokens streamed out.

    A front over the backend's text engine API (``AsyncLlamaEngine.generate``, the same API
    the OpenAI front uses), not over PredictStream: greedy, until end of generation; each
    piece of text becomes one ``GenerateResponse.token``. Backends without a text engine
    answer UNIMPLEMENTED.
    """

    def __init__(self, runtime: BackendRuntime) -> None:
        self.runtime = runtime

    def generic_handler(self) -> grpc.GenericRpcHandler:
        rpc = LLM_RPCS["Generate"]
        return grpc.method_handlers_generic_handler(
            LLM_SERVICE_NAME,
            {
                "Generate": grpc.unary_stream_rpc_method_handler(
                    self.generate, None, rpc.response.SerializeToString
                )
            },
        )

    def _engine(self) -> Any:
        backend = self.runtime.backend
        if not backend.has_text_engine:
            raise Unsupported(backend.name, "LLMService.Generate", "it has no text-generation engine")
        engine = backend.text_engine()
        if engine is None:
            raise NoModelLoaded(backend.name, "Generate")
        return engine

    async def generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[llm_pb2.GenerateResponse]:
        ctx = _call_context("Generate", context)
        try:
            request = await decode_async(llm_pb2.GenerateRequest, raw)
            from inferd.engines.llama import SamplingParams  # only backends with a llama engine get here

            self._engine()  # UNIMPLEMENTED before the gate, as for every rpc
            # The engine is used directly, so hold the lifecycle gate as a model rpc does:
            # Free/LoadModel withdraw this stream (UNAVAILABLE) instead of freeing under it.
            async with self.runtime.model_call("Generate", ctx, streaming=True):
                stream = self._engine().generate(request.prompt, SamplingParams(temperature=0.0),
                                                 is_cancelled=ctx.cancelled)
                async with contextlib.aclosing(stream):  # closed (aborted) before the lease goes
                    async for out in stream:
                        if ctx.revoked:
                            break
                        if out.text:
                            yield llm_pb2.GenerateResponse(token=out.text)
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, "Generate")
