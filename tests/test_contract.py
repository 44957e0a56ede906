"""Every rpc of the contract answers, over the network and embedded, with precise codes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from inferd.client import RpcError
from inferd.proto import backend_pb2 as pb
from inferd.protocol import RPCS
from tests.fixtures_backend import EchoBackend

IMPLEMENTED = {"Predict", "PredictStream", "TokenizeString"}
LIFECYCLE = {"Health", "LoadModel", "Free", "Status"}


async def _invoke(client, name: str, request=None):
    rpc = RPCS[name]
    if rpc.streaming:
        return [r async for r in client.call_stream(name, request)]
    return await client.call(name, request)


@pytest.mark.parametrize("name", sorted(set(RPCS) - IMPLEMENTED - LIFECYCLE))
async def test_missing_capability_is_unimplemented_naming_backend_and_rpc(echo_client, name):
    with pytest.raises(RpcError) as err:
        await _invoke(echo_client, name)
    assert err.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert "'echo'" in err.value.details and name in err.value.details


@pytest.mark.parametrize("name", sorted(IMPLEMENTED))
async def test_capability_without_model_is_failed_precondition(echo_client, name):
    with pytest.raises(RpcError) as err:
        await _invoke(echo_client, name, RPCS[name].request(Prompt="x"))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "LoadModel" in err.value.details


async def test_lifecycle_and_capabilities(echo_client):
    assert (await echo_client.health(timeout=5)).message == b"OK"
    st = await echo_client.status()
    assert st.state == pb.StatusResponse.UNINITIALIZED
    assert st.memory.total > 0 and st.memory.breakdown["rss"] == st.memory.total
    assert {"rss", "vms"} <= set(st.memory.breakdown)

    bad = await echo_client.load_model(Model="/nonexistent/model.gguf")
    assert not bad.success and "not found" in bad.message
    assert (await echo_client.status()).state == pb.StatusResponse.ERROR

    ok = await echo_client.load_model(Model="test-model")
    assert ok.success and ok.message == "loaded test-model"
    assert (await echo_client.status()).state == pb.StatusResponse.READY

    assert (await echo_client.predict(Prompt="hello")).message == b"hello"
    assert [r.message async for r in echo_client.predict_stream(Prompt="a b")] == [b"a ", b"b "]
    tok = await echo_client.tokenize_string(Prompt="ab cde")
    assert tok.length == 2 and list(tok.tokens) == [2, 3]

    freed = await echo_client.free()
    assert freed.success and freed.message == "model freed"
    with pytest.raises(RpcError) as err:
        await echo_client.predict(Prompt="x")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_errors_map_to_precise_codes(echo_client):
    await echo_client.load_model(Model="test-model")
    with pytest.raises(RpcError) as err:
        await echo_client.predict(Prompt="x", Tokens=-1)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "Tokens" in err.value.details
    with pytest.raises(RpcError) as err:
        await echo_client.predict(Prompt="boom")
    assert err.value.code == grpc.StatusCode.INTERNAL and "kaboom" in err.value.details
    # the server survives and keeps serving
    assert (await echo_client.predict(Prompt="still here")).message == b"still here"


async def test_deadline_cancels_work_and_frees_the_lock(echo_client, echo_backend: EchoBackend):
    await echo_client.load_model(Model="test-model")
    with pytest.raises(RpcError) as err:
        await echo_client.predict(Prompt="block:30", timeout=0.3)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(500):  # the worker notices the deadline and stops (slow CI: up to 10 s)
        if not echo_backend.busy():
            break
        await asyncio.sleep(0.02)
    assert not echo_backend.busy() and echo_backend.cancelled_calls == 1
    assert (await echo_client.predict(Prompt="next", timeout=5)).message == b"next"


async def test_request_type_is_checked(echo_client):
    with pytest.raises(TypeError):
        await echo_client.predict(pb.ModelOptions())
