"""Auth, TLS, mTLS, message limits, reflection and grpc.health.v1 on a real server."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inferd.client import ChannelOptions, RpcError, new_client
from inferd.proto import backend_pb2 as pb
from tests.certs import make_pki
from tests.helpers import running_server

KEY = "s3cret-key"
TOKEN = "localai-token"


async def _health(address: str, **opts) -> bytes:
    client = new_client(address, options=ChannelOptions(**opts))
    try:
        return (await client.health(timeout=5)).message
    finally:
        await client.close()


async def _code(coro) -> grpc.StatusCode:
    with pytest.raises(RpcError) as err:
        await coro
    return err.value.code


async def test_api_key_and_localai_token(echo_backend):
    async with running_server(echo_backend, require_api_key=True, api_key=KEY, localai_auth_token=TOKEN) as s:
        addr = f"127.0.0.1:{s.port}"
        assert await _code(_health(addr)) == grpc.StatusCode.UNAUTHENTICATED
        assert await _code(_health(addr, api_key="wrong")) == grpc.StatusCode.UNAUTHENTICATED
        assert await _health(addr, api_key=KEY) == b"OK"
        assert await _health(addr, api_key=TOKEN) == b"OK"
        # x-api-key header also works; a raw token without "Bearer " and an empty Bearer do not
        assert await _health(addr, metadata=(("x-api-key", KEY),)) == b"OK"
        assert await _code(_health(addr, metadata=(("authorization", TOKEN),))) == grpc.StatusCode.UNAUTHENTICATED
        assert await _code(_health(addr, metadata=(("authorization", "Bearer "),))) == grpc.StatusCode.UNAUTHENTICATED
        # streams are protected too
        client = new_client(addr)
        with pytest.raises(RpcError) as err:
            async for _ in client.predict_stream(Prompt="a"):
                pass
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        await client.close()
        # grpc.health.v1 is protected unless INFERD_HEALTH_OPEN
        async with grpc.aio.insecure_channel(addr) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_open_leaves_only_grpc_health_unauthenticated(echo_backend):
    async with running_server(echo_backend, localai_auth_token=TOKEN, health_open=True) as s:
        addr = f"127.0.0.1:{s.port}"
        async with grpc.aio.insecure_channel(addr) as ch:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        assert await _code(_health(addr)) == grpc.StatusCode.UNAUTHENTICATED


async def test_grpc_health_follows_model_state(echo_backend):
    async with running_server(echo_backend) as s:
        addr = f"127.0.0.1:{s.port}"
        client = new_client(addr)
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = health_pb2_grpc.HealthStub(ch)

            async def status(service: str) -> int:
                return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status

            assert await status("") == health_pb2.HealthCheckResponse.SERVING
            assert await status("backend.Backend") == health_pb2.HealthCheckResponse.NOT_SERVING
            await client.load_model(Model="test-model")
            assert await status("backend.Backend") == health_pb2.HealthCheckResponse.SERVING
            await client.free()
            assert await status("backend.Backend") == health_pb2.HealthCheckResponse.NOT_SERVING
        await client.close()


async def test_tls_and_mtls(echo_backend, tmp_path):
    pki = make_pki(tmp_path)
    async with running_server(echo_backend, use_tls=True, cert_file=pki["server_cert"], key_file=pki["server_key"]) as s:
        addr = f"127.0.0.1:{s.port}"
        assert await _health(addr, tls=True, ca_file=pki["ca"], server_name="localhost") == b"OK"
        # plaintext to a TLS server fails; a client that does not trust the CA fails
        assert await _code(_health(addr)) == grpc.StatusCode.UNAVAILABLE
        assert await _code(_health(addr, tls=True, ca_file=pki["other_ca"])) == grpc.StatusCode.UNAVAILABLE

    async with running_server(
        echo_backend, use_tls=True, cert_file=pki["server_cert"], key_file=pki["server_key"], client_ca_file=pki["ca"]
    ) as s:
        addr = f"127.0.0.1:{s.port}"
        good = dict(tls=True, ca_file=pki["ca"], server_name="localhost")
        assert await _health(addr, **good, cert_file=pki["client_cert"], key_file=pki["client_key"]) == b"OK"
        assert await _code(_health(addr, **good)) == grpc.StatusCode.UNAVAILABLE  # no client cert
        rogue = dict(cert_file=pki["rogue_cert"], key_file=pki["rogue_key"])
        assert await _code(_health(addr, **good, **rogue)) == grpc.StatusCode.UNAVAILABLE


async def test_oversize_message_is_resource_exhausted(echo_backend):
    async with running_server(echo_backend, max_message_size=64 * 1024) as s:
        client = new_client(f"127.0.0.1:{s.port}")
        await client.load_model(Model="test-model")
        code = await _code(client.predict(Prompt="x" * (128 * 1024)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await client.predict(Prompt="small")).message == b"small"
        await client.close()


@pytest.mark.parametrize("service", ["grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"])
async def test_reflection_lists_services(echo_backend, service):
    async with running_server(echo_backend) as s:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") as ch:
            method = ch.stream_stream(
                f"/{service}/ServerReflectionInfo",
                reflection_pb2.ServerReflectionRequest.SerializeToString,
                reflection_pb2.ServerReflectionResponse.FromString,
            )
            call = method(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            resp = await call.read()
            names = {svc.name for svc in resp.list_services_response.service}
            assert {"backend.Backend", "entity.grpc.LLMService", "grpc.health.v1.Health"} <= names


async def test_reflection_can_be_disabled(echo_backend):
    async with running_server(echo_backend, enable_reflection=False) as s:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.read()
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_llm_service_generate_on_a_backend_without_text_engine_is_unimplemented(echo_backend):
    """LLMService is a front over a text engine (tests/test_llama_backend.py streams from llama);
    a backend that declares none answers UNIMPLEMENTED naming it, never INTERNAL."""
    from inferd.proto import llm_pb2, llm_pb2_grpc

    async with running_server(echo_backend) as s:
        await s.load(pb.ModelOptions(Model="test-model"))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") as ch:
            stub = llm_pb2_grpc.LLMServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [r.token async for r in stub.Generate(llm_pb2.GenerateRequest(prompt="one two"))]
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "no text-generation engine" in err.value.details()
