"""Cancellation and deadlines at random points leave the backend as it was.

Dozens of generations and embeddings are cut at random moments (client cancel after a random
delay or after the n-th streamed token, deadlines from 10 ms to 600 ms), eight at a time.
Afterwards: Status is READY (not BUSY), llama-cpp reports every slot free and nothing waiting
(GetMetrics), and the next requests run at full speed: their median within 3x (plus 1 s of
scheduling noise on a shared machine) of the same request's median before the storm. A slot or
a batcher left stuck by a cut call would cost a deadline, many seconds.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import grpc
from google.protobuf.message import Message

from inferd.proto import backend_pb2 as pb
from inferd.protocol import RPCS
from tests.reliability.servers import ServerProc

GENERATION = pb.PredictOptions(Prompt="Write a long story about a cat", Tokens=48, IgnoreEOS=True,
                               Temperature=0.0)
EMBED = pb.PredictOptions(Embeddings=" ".join(["the quick brown fox jumps over the lazy dog"] * 20))
# Cut calls may end in these; anything else (INTERNAL, UNKNOWN, UNAVAILABLE) is a failure.
CUT_CODES = frozenset({"OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})


def _method(channel: grpc.aio.Channel, rpc: str):  # type: ignore[no-untyped-def]
    info = RPCS[rpc]
    factory = channel.unary_stream if info.streaming else channel.unary_unary
    return factory(info.path, info.request.SerializeToString, info.response.FromString)


async def _median_time(channel: grpc.aio.Channel, rpc: str, request: Message, n: int = 3) -> float:
    """Median of ``n`` timed calls: one scheduling hiccup of a shared machine does not decide."""
    return statistics.median([await _timed(channel, rpc, request) for _ in range(n)])


async def _timed(channel: grpc.aio.Channel, rpc: str, request: Message) -> float:
    start = time.monotonic()
    if RPCS[rpc].streaming:
        async for _ in _method(channel, rpc)(request, timeout=60):
            pass
    else:
        await _method(channel, rpc)(request, timeout=60)
    return time.monotonic() - start


async def _cut(channel: grpc.aio.Channel, rpc: str, request: Message, rng: random.Random) -> str:
    """One call cut at a random point; returns the status name it ended with."""
    how = rng.choice(("deadline", "cancel-after-delay", "cancel-after-tokens"))
    timeout = rng.uniform(0.01, 0.6) if how == "deadline" else 60.0
    call = _method(channel, rpc)(request, timeout=timeout)
    try:
        if RPCS[rpc].streaming:
            n = 0
            limit = rng.randint(0, 6) if how == "cancel-after-tokens" else None
            if how == "cancel-after-delay":
                asyncio.get_running_loop().call_later(rng.uniform(0.0, 0.4), call.cancel)
            async for _ in call:
                n += 1
                if limit is not None and n >= limit:
                    call.cancel()
                    break
        else:
            if how != "deadline":
                asyncio.get_running_loop().call_later(rng.uniform(0.0, 0.4), call.cancel)
            await call
    except asyncio.CancelledError:
        return "CANCELLED"
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}" if exc.code().name not in CUT_CODES else exc.code().name
    return "CANCELLED" if call.cancelled() else "OK"


async def _storm(server: ServerProc, rpcs: list[str], request: Message, calls: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(8)
    async with grpc.aio.insecure_channel(server.address) as channel:

        async def one(i: int) -> str:
            async with sem:
                return await _cut(channel, rng.choice(rpcs), request, rng)

        return await asyncio.gather(*(one(i) for i in range(calls)))


async def _settled(server: ServerProc, timeout: float = 10.0) -> pb.StatusResponse:
    end = time.monotonic() + timeout
    while True:
        status = server.unary("Status", pb.HealthMessage(), timeout=5)
        if status.state == pb.StatusResponse.READY or time.monotonic() > end:  # type: ignore[attr-defined]
            return status  # type: ignore[return-value]
        await asyncio.sleep(0.05)


async def _slots_free(server: ServerProc, timeout: float = 10.0) -> dict:
    """llama-cpp's slot counters (GetMetrics), polled until no slot is active or waiting."""
    end = time.monotonic() + timeout
    while True:
        metrics = server.unary("GetMetrics", pb.MetricsRequest(), timeout=5)
        slots = json.loads(metrics.prompt_json_for_slot)  # type: ignore[attr-defined]
        if (slots.get("active") == 0 and slots.get("waiting") == 0) or time.monotonic() > end:
            return slots
        await asyncio.sleep(0.05)


async def test_llama_generations_cut_at_random_points(trio) -> None:
    server = trio["llama-cpp"]
    async with grpc.aio.insecure_channel(server.address) as channel:
        await _timed(channel, "Predict", GENERATION)  # warm
        baseline = await _median_time(channel, "Predict", GENERATION)
    outcomes = await _storm(server, ["Predict", "PredictStream"], GENERATION, 48, seed=7)
    bad = [o for o in outcomes if o not in CUT_CODES]
    assert not bad, bad
    assert "CANCELLED" in outcomes or "DEADLINE_EXCEEDED" in outcomes
    status = await _settled(server)
    assert status.state == pb.StatusResponse.READY, pb.StatusResponse.State.Name(status.state)
    slots = await _slots_free(server)
    assert slots.get("active") == 0 and slots.get("waiting") == 0, f"slots still held 10 s after the storm: {slots}"
    async with grpc.aio.insecure_channel(server.address) as channel:
        after = await _median_time(channel, "Predict", GENERATION)
    print(f"\nbaseline {baseline * 1000:.0f} ms, after the storm {after * 1000:.0f} ms; outcomes "
          f"{ {o: outcomes.count(o) for o in set(outcomes)} }")
    assert after <= 3 * baseline + 1.0, f"next request took {after:.2f}s, baseline {baseline:.2f}s"


async def test_embeddings_cut_at_random_points(trio) -> None:
    server = trio["sentence-embeddings"]
    async with grpc.aio.insecure_channel(server.address) as channel:
        await _timed(channel, "Embedding", EMBED)
        baseline = await _median_time(channel, "Embedding", EMBED)
    outcomes = await _storm(server, ["Embedding"], EMBED, 48, seed=11)
    bad = [o for o in outcomes if o not in CUT_CODES]
    assert not bad, bad
    status = await _settled(server)
    assert status.state == pb.StatusResponse.READY, pb.StatusResponse.State.Name(status.state)
    async with grpc.aio.insecure_channel(server.address) as channel:
        after = await _median_time(channel, "Embedding", EMBED)
    assert after <= 3 * baseline + 1.0, f"next request took {after:.2f}s, baseline {baseline:.2f}s"
