"""local-store: LoadModel and Free while Stores calls are in flight (and an index build runs)."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from inferd.backends.local_store import LocalStoreBackend
from inferd.client import RpcError, new_client
from inferd.proto import backend_pb2 as pb
from tests.helpers import running_server

DELIBERATE = {grpc.StatusCode.UNAVAILABLE}  # the lifecycle gate: "model is being loaded/unloaded"


async def test_free_and_load_while_calls_are_in_flight() -> None:
    rng = np.random.default_rng(2)
    data = rng.standard_normal((4000, 32)).astype(np.float32)
    keys = [pb.StoresKey(Floats=r) for r in data.tolist()]
    backend = LocalStoreBackend()
    options = ["ann_threshold:1000", "ann_probe_size:0", "ann_build_nice:0"]  # builds during the churn
    async with running_server(backend) as server:
        address = f"127.0.0.1:{server.port}"
        counts: dict[str, int] = {}
        stop = time.monotonic() + 4.0

        async def hammer(i: int) -> None:
            c = new_client(address)
            try:
                n = 0
                while time.monotonic() < stop:
                    s = (n * 250 + i * 1000) % 3750
                    try:
                        if n % 3 == 0:
                            await c.stores_set(Keys=keys[s : s + 250],
                                               Values=[pb.StoresValue(Bytes=b"v")] * 250)
                        elif n % 3 == 1:
                            await c.stores_find(Key=keys[s], TopK=5)
                        else:
                            await c.stores_get(Keys=keys[s : s + 5])
                        counts["OK"] = counts.get("OK", 0) + 1
                    except RpcError as exc:
                        assert exc.code in DELIBERATE, exc
                        counts[exc.code.name] = counts.get(exc.code.name, 0) + 1
                    n += 1
            finally:
                await c.close()

        async def churn() -> None:
            c = new_client(address)
            try:
                while time.monotonic() < stop:
                    assert (await c.load_model(Model="store://churn", Options=options)).success
                    await asyncio.sleep(0.2)
                    assert (await c.free()).success
            finally:
                await c.close()

        await asyncio.gather(churn(), *(hammer(i) for i in range(3)))
        c = new_client(address)
        try:
            assert (await c.health()).message == b"OK"
            assert (await c.load_model(Model="store://churn")).success
            await c.stores_set(Keys=keys[:2], Values=[pb.StoresValue(Bytes=b"a"), pb.StoresValue(Bytes=b"b")])
            assert (await c.stores_find(Key=keys[1], TopK=1)).Values[0].Bytes == b"b"
        finally:
            await c.close()
        assert counts.get("OK", 0) > 20, counts
