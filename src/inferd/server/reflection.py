"""gRPC server reflection (v1 and v1alpha) that resolves every symbol grpcurl asks for.

Why not grpcio-reflection's servicer: it answers ``file_containing_symbol`` with
``DescriptorPool.FindFileContainingSymbol`` alone, and the upb-based protobuf runtime
does not index method names there, so ``grpcurl describe backend.Backend.Predict`` fails
with "Symbol not found" (grpc/grpc#34743), where a Go or C++ server answers. This
servicer resolves, in order: anything the pool finds itself (services, messages, enums,
nested types, top-level enum values), then a method of a service, a field or oneof of a
message, an enum value nested in a message or enum. Everything else is NOT_FOUND with the
symbol named in the error message.

Both service names are served with the same code: ``grpc.reflection.v1alpha`` (grpcurl
1.8 speaks it) and ``grpc.reflection.v1`` (newer clients); the two protocols are
wire-identical, so one message class serves both. grpcio-reflection ships no v1
descriptor, so one is derived from the v1alpha file (package renamed) into a private
pool, which lets clients describe the v1 service too without touching the default pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from inferd.server.decoding import decoding_method_handler

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED.value[0]


def _v1_pool() -> descriptor_pool.DescriptorPool:
    """A pool holding grpc.reflection.v1's file, derived from v1alpha's (same messages, new package)."""
    proto = descriptor_pb2.FileDescriptorProto()
    rpb.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(old):
                f.type_name = new + f.type_name[len(old):]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(proto.SerializeToString())
    return pool


class ReflectionServicer:
    """Answers ``ServerReflectionInfo`` from the default descriptor pool (and the v1 file)."""

    def __init__(self, service_names: Iterable[str], pools: Iterable[descriptor_pool.DescriptorPool] = ()) -> None:
        self.service_names = tuple(sorted(set(service_names)))
        self.pools = tuple(pools) or (descriptor_pool.Default(), _v1_pool())
        self._serialized: dict[str, bytes] = {}

    async def ServerReflectionInfo(  # noqa: N802 - the rpc's name
        self, requests: AsyncIterator[rpb.ServerReflectionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.ServerReflectionResponse]:
        async for request in requests:
            yield self.answer(request)

    # ---- one request -------------------------------------------------------------------
    def answer(self, request: rpb.ServerReflectionRequest) -> rpb.ServerReflectionResponse:
        kind = request.WhichOneof("message_request")
        if kind == "list_services":
            return rpb.ServerReflectionResponse(
                valid_host=request.host, original_request=request,
                list_services_response=rpb.ListServiceResponse(
                    service=[rpb.ServiceResponse(name=n) for n in self.service_names]))
        if kind == "file_by_filename":
            file = self._find(lambda p: p.FindFileByName(request.file_by_filename))
            return self._files(request, file, f"file {_shown(request.file_by_filename)}")
        if kind == "file_containing_symbol":
            symbol = request.file_containing_symbol
            return self._files(request, self.file_containing_symbol(symbol), f"symbol {_shown(symbol)}")
        if kind == "file_containing_extension":
            ext = request.file_containing_extension
            file = self._find(lambda p: p.FindExtensionByNumber(
                p.FindMessageTypeByName(ext.containing_type), ext.extension_number).file)
            return self._files(request, file, f"extension {ext.extension_number} of {_shown(ext.containing_type)}")
        if kind == "all_extension_numbers_of_type":
            name = request.all_extension_numbers_of_type
            found = self._find(lambda p: (p.FindMessageTypeByName(name),
                                          sorted(e.number for e in p.FindAllExtensions(p.FindMessageTypeByName(name)))))
            if found is None:
                return _error(request, _NOT_FOUND, f"message type {_shown(name)} not found")
            message, numbers = found
            return rpb.ServerReflectionResponse(
                valid_host=request.host, original_request=request,
                all_extension_numbers_response=rpb.ExtensionNumberResponse(
                    base_type_name=message.full_name, extension_number=numbers))
        if kind is None:
            return _error(request, _INVALID, "empty ServerReflectionRequest: set one of its message_request fields")
        return _error(request, _UNIMPLEMENTED, f"{kind} is not supported")  # pragma: no cover - new oneof member

    def file_containing_symbol(self, symbol: str) -> Any:
        """The file descriptor defining ``symbol`` (service, method, message, field, enum, value) or None."""
        file = self._find(lambda p: p.FindFileContainingSymbol(symbol))
        if file is not None:
            return file
        parent, _, leaf = symbol.rpartition(".")
        if not parent or not leaf:
            return None

        def member(pool: descriptor_pool.DescriptorPool) -> Any:
            for find, has in (
                (pool.FindServiceByName, lambda d: leaf in d.methods_by_name),
                (pool.FindMessageTypeByName, lambda d: leaf in d.fields_by_name or leaf in d.oneofs_by_name
                 or any(leaf in e.values_by_name for e in d.enum_types)),
                (pool.FindEnumTypeByName, lambda d: leaf in d.values_by_name),
            ):
                try:
                    d = find(parent)
                except KeyError:
                    continue
                if has(d):
                    return d.file
            raise KeyError(symbol)

        return self._find(member)

    # ---- helpers -----------------------------------------------------------------------
    def _find(self, lookup: Any) -> Any:
        for pool in self.pools:
            try:
                return lookup(pool)
            except KeyError:
                continue
        return None

    def _files(self, request: rpb.ServerReflectionRequest, file: Any, what: str) -> rpb.ServerReflectionResponse:
        if file is None:
            return _error(request, _NOT_FOUND, f"{what} not found")
        ordered: list[Any] = []
        seen: set[str] = set()

        def visit(f: Any) -> None:  # the file first, then its dependencies (transitively)
            if f.name in seen:
                return
            seen.add(f.name)
            ordered.append(f)
            for dep in f.dependencies:
                visit(dep)

        visit(file)
        return rpb.ServerReflectionResponse(
            valid_host=request.host, original_request=request,
            file_descriptor_response=rpb.FileDescriptorResponse(
                file_descriptor_proto=[self._serialize(f) for f in ordered]))

    def _serialize(self, file: Any) -> bytes:
        data = self._serialized.get(file.name)
        if data is None:
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            data = self._serialized[file.name] = proto.SerializeToString()
        return data


def _shown(name: str, limit: int = 200) -> str:
    """A name for an error message: quoted, and cut if a client sent something huge."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}... ({len(name)} characters)"


def _error(request: rpb.ServerReflectionRequest, code: int, message: str) -> rpb.ServerReflectionResponse:
    return rpb.ServerReflectionResponse(
        valid_host=request.host, original_request=request,
        error_response=rpb.ErrorResponse(error_code=code, error_message=message))


def reflection_handlers(service_names: Iterable[str]) -> list[grpc.GenericRpcHandler]:
    """Generic handlers serving reflection under both names (requests parsed in the handler)."""
    servicer = ReflectionServicer([*service_names, V1ALPHA, V1])
    method = decoding_method_handler(grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, rpb.ServerReflectionRequest.FromString,
        rpb.ServerReflectionResponse.SerializeToString))
    return [grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method}) for name in (V1ALPHA, V1)]
