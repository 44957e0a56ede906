"""The client's retry policy (inferd.client.retry) against real servers: what is retried, what is not."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from inferd.client import RetryPolicy, RpcError, new_client
from inferd.client.retry import RAY_LOST_REPLICA_MARKERS
from inferd.proto import backend_pb2 as pb
from inferd.server.app import InferdServer
from tests.fixtures_backend import EchoBackend
from tests.helpers import free_port, running_server
from tests.helpers import test_settings as settings_for_tests


def _recorder() -> tuple[list[tuple[str, grpc.StatusCode, int]], RetryPolicy]:
    seen: list[tuple[str, grpc.StatusCode, int]] = []
    return seen, RetryPolicy(max_attempts=20, initial_backoff=0.05, max_backoff=0.2,
                             on_retry=lambda rpc, exc, n: seen.append((rpc, exc.code, n)))


async def _start_later(port: int, delay: float, started: asyncio.Event, stop: asyncio.Event) -> None:
    await asyncio.sleep(delay)
    server = InferdServer(settings_for_tests().with_overrides(port=port), EchoBackend())
    await server.start()
    try:
        started.set()
        await stop.wait()
    finally:
        await server.stop(0)


async def test_unary_and_stream_retry_until_the_server_is_up() -> None:
    seen, policy = _recorder()
    port = free_port()
    started, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(_start_later(port, 0.5, started, stop))
    client = new_client(f"127.0.0.1:{port}", parallel=True, retry=policy)
    try:
        assert (await client.call("Health", timeout=20)).message == b"OK"
        assert started.is_set() and seen and all(code == grpc.StatusCode.UNAVAILABLE for _, code, _ in seen)
        assert [n for _, _, n in seen] == list(range(1, len(seen) + 1))
        assert (await client.call("LoadModel", Model="test-model")).success
        words = [r.message async for r in client.call_stream("PredictStream", Prompt="a b c")]
        assert words == [b"a ", b"b ", b"c "]
    finally:
        stop.set()
        await server
        await client.close()


async def test_stream_not_yet_answered_is_retried() -> None:
    seen, policy = _recorder()
    port = free_port()
    started, stop = asyncio.Event(), asyncio.Event()
    client = new_client(f"127.0.0.1:{port}", parallel=True, retry=policy)
    server = asyncio.create_task(_start_later(port, 0.3, started, stop))
    try:
        # The stream starts before the server: UNAVAILABLE is retried; once the server is up,
        # it answers FAILED_PRECONDITION (no model loaded), which is final.
        with pytest.raises(RpcError) as exc:
            async for _ in client.call_stream("PredictStream", Prompt="a b", timeout=20):
                pass
        assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert seen and {code for _, code, _ in seen} == {grpc.StatusCode.UNAVAILABLE}
    finally:
        stop.set()
        await server
        await client.close()


async def test_non_idempotent_rpcs_are_never_retried() -> None:
    seen, policy = _recorder()
    client = new_client(f"127.0.0.1:{free_port()}", parallel=True, retry=policy)
    try:
        for rpc in ("LoadModel", "Free"):
            with pytest.raises(RpcError) as exc:
                await client.call(rpc, timeout=5)
            assert exc.value.code == grpc.StatusCode.UNAVAILABLE
        assert seen == []
    finally:
        await client.close()


async def test_the_call_timeout_bounds_all_attempts() -> None:
    seen, _ = _recorder()
    policy = RetryPolicy(max_attempts=100, initial_backoff=0.05, max_backoff=0.1,
                         on_retry=lambda rpc, exc, n: seen.append((rpc, exc.code, n)))
    client = new_client(f"127.0.0.1:{free_port()}", parallel=True, retry=policy)
    started = time.monotonic()
    try:
        with pytest.raises(RpcError) as exc:
            await client.call("Health", timeout=1.0)
        assert exc.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert time.monotonic() - started < 3.0
        assert 1 <= len(seen) < 100
    finally:
        await client.close()


@pytest.mark.parametrize("replay", [False, True])
async def test_committed_stream_is_replayed_only_when_asked(replay: bool) -> None:
    """A stream cut by LoadModel (UNAVAILABLE "model is being unloaded") after its first reply."""
    backend = EchoBackend()
    seen: list[int] = []
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.05, replay_streams=replay,
                         on_retry=lambda rpc, exc, n: seen.append(n))
    async with running_server(backend) as server:
        address = f"127.0.0.1:{server.port}"
        admin = new_client(address, parallel=True)
        client = new_client(address, parallel=True, retry=policy)
        try:
            assert (await admin.call("LoadModel", Model="test-model")).success
            got: list[bytes] = []

            async def consume() -> None:
                async for reply in client.call_stream("PredictStream", Prompt="slow:0.15 a b c d e f", timeout=30):
                    got.append(reply.message)

            task = asyncio.create_task(consume())
            while len(got) < 2:
                await asyncio.sleep(0.01)
            assert (await admin.call("LoadModel", Model="test-model", timeout=20)).success  # withdraws the stream
            if replay:
                await task
                assert got == [b"a ", b"b ", b"c ", b"d ", b"e ", b"f "]  # each reply once, in order
                assert seen and seen == list(range(1, len(seen) + 1))  # re-opened while the load ran, too
            else:
                with pytest.raises(RpcError) as exc:
                    await task
                assert exc.value.code == grpc.StatusCode.UNAVAILABLE and seen == []
                assert got[:2] == [b"a ", b"b "]
        finally:
            await admin.close()
            await client.close()


def test_which_errors_are_retryable() -> None:
    policy = RetryPolicy()
    lost = RpcError(grpc.StatusCode.INTERNAL, f"{RAY_LOST_REPLICA_MARKERS[0]} before finishing this task.")
    assert policy.retryable("PredictStream", lost)
    assert policy.retryable("Predict", RpcError(grpc.StatusCode.UNAVAILABLE, "model is being loaded"))
    assert not policy.retryable("Predict", RpcError(grpc.StatusCode.INTERNAL, "internal error in Predict"))
    assert not policy.retryable("Predict", RpcError(grpc.StatusCode.INVALID_ARGUMENT, "Tokens"))
    assert not policy.retryable("StartFineTune", RpcError(grpc.StatusCode.UNAVAILABLE, "x"))
    assert not RetryPolicy(lost_replica=False).retryable("Predict", lost)
    custom = RetryPolicy(codes=frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED}))
    assert custom.retryable("Embedding", RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"))
    assert not custom.retryable("Embedding", RpcError(grpc.StatusCode.UNAVAILABLE, "x"))
    assert all(0 <= policy.backoff(n) <= policy.max_backoff for n in range(1, 30))
    for bad in ({"max_attempts": 0}, {"max_attempts": 101}, {"initial_backoff": 5, "max_backoff": 1},
                {"multiplier": 0.5}, {"initial_backoff": -1}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def test_request_type_survives_pickling() -> None:
    """Ray's proxy pickles requests to replicas: the stubs' messages must pickle by import path."""
    import pickle

    request = pb.PredictOptions(Prompt="x", Tokens=3)
    assert type(request).__module__ == "inferd.proto.backend_pb2"
    assert pickle.loads(pickle.dumps(request)) == request
