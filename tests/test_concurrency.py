"""SingleThread serialization, busy/Status transitions, cancellation, client busy marks."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from inferd.client import RpcError, new_client
from inferd.proto import backend_pb2 as pb
from tests.fixtures_backend import EchoBackend, ParallelEchoBackend
from tests.helpers import running_server


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("backend_cls,expected_max", [(EchoBackend, 1), (ParallelEchoBackend, 4)])
async def test_single_thread_serializes_parallel_does_not(backend_cls, expected_max):
    backend = backend_cls()
    async with running_server(backend) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        await client.load_model(Model="test-model")
        replies = await asyncio.gather(*(client.predict(Prompt="block:0.3") for _ in range(4)))
        assert all(r.message == b"block:0.3" for r in replies)
        assert backend.max_active == expected_max
        await client.close()


async def test_status_busy_while_working_and_health_still_answers(echo_backend):
    async with running_server(echo_backend) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        await client.load_model(Model="test-model")
        call = asyncio.ensure_future(client.predict(Prompt="block:0.5"))
        await _wait_for(echo_backend.started.is_set)
        assert echo_backend.busy()
        assert (await client.status(timeout=2)).state == pb.StatusResponse.BUSY
        assert await client.health_check(timeout=2)  # not blocked by the call lock
        await call
        assert (await client.status()).state == pb.StatusResponse.READY
        await client.close()


async def test_cancelled_stream_stops_work_and_releases_lock(echo_backend):
    async with running_server(echo_backend) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        await client.load_model(Model="test-model")
        words = " ".join(f"w{i}" for i in range(1000))
        stream = client.predict_stream(Prompt=f"slow:0.02 {words}")
        got = []
        async for reply in stream:
            got.append(reply)
            if len(got) == 3:
                break
        await stream.aclose()
        await _wait_for(lambda: not echo_backend.busy())
        assert echo_backend.cancelled_calls == 1
        assert not echo_backend.call_lock.locked()
        # the next call gets the lock at once
        assert (await client.predict(Prompt="after", timeout=2)).message == b"after"
        await client.close()


async def test_cancelled_unary_releases_lock(echo_backend):
    async with running_server(echo_backend) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        await client.load_model(Model="test-model")
        call = asyncio.ensure_future(client.predict(Prompt="block:30"))
        await _wait_for(echo_backend.started.is_set)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await _wait_for(lambda: not echo_backend.call_lock.locked())
        assert echo_backend.cancelled_calls == 1
        await client.close()


class RecordingWatchdog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def mark(self, address: str) -> None:
        self.events.append(("mark", address))

    def unmark(self, address: str) -> None:
        self.events.append(("unmark", address))


async def test_client_busy_marks_and_serialization(echo_backend):
    async with running_server(echo_backend) as server:
        address = f"127.0.0.1:{server.port}"
        wd = RecordingWatchdog()
        client = new_client(address, parallel=False, watchdog=wd)
        await client.load_model(Model="test-model")
        assert not client.is_busy()
        call = asyncio.ensure_future(client.predict(Prompt="block:0.3"))
        await _wait_for(client.is_busy)
        await client.status()  # Status neither waits for the client lock nor marks
        await call
        assert not client.is_busy()
        assert wd.events == [("mark", address), ("unmark", address)] * 2  # LoadModel, Predict
        # disabled watchdog: no marks
        quiet = new_client(address, watchdog=wd, enable_watchdog=False)
        await quiet.predict(Prompt="x")
        assert len(wd.events) == 4
        await client.close()
        await quiet.close()


async def test_error_inside_stream_maps_status(echo_backend):
    async with running_server(echo_backend) as server:
        client = new_client(f"127.0.0.1:{server.port}")
        with pytest.raises(RpcError) as err:
            async for _ in client.predict_stream(Prompt="x"):
                pass
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        await client.close()


async def test_concurrent_rpc_limit_refuses_excess(echo_backend):
    backend = ParallelEchoBackend()
    async with running_server(backend, max_concurrent_rpcs=2) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        await client.load_model(Model="test-model")
        results = await asyncio.gather(
            *(client.predict(Prompt="block:0.5") for _ in range(5)), return_exceptions=True
        )
        refused = [r for r in results if isinstance(r, RpcError)]
        assert refused and all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
        assert sum(1 for r in results if isinstance(r, pb.Reply)) >= 2
        await client.close()
