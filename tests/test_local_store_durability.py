"""local-store durability: no acknowledged StoresSet/StoresDelete is lost to a kill -9.

A real ``inferd serve --backend local-store --store-path DIR`` subprocess takes
concurrent writes; it is SIGKILLed while requests are in flight (with compaction
running every few dozen writes), restarted on the same directory, and every
acknowledged write must be there: acknowledged Sets with their value, acknowledged
Deletes gone. Writes in flight at the kill may or may not have happened.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import numpy as np
import pytest

from inferd.client import RpcError, new_client
from inferd.proto import backend_pb2 as pb
from tests.helpers import spawned_server

DIM = 64
OPTIONS = json.dumps({"Options": ["compact_bytes:16384", "compact_ratio:0.25"]})


def key_of(writer: int, i: int) -> list[float]:
    rng = np.random.default_rng(writer * 100_000 + i)
    return rng.standard_normal(DIM).astype(np.float32).tolist()


class Ledger:
    """What the client knows for sure: acknowledged sets and deletes, and what was in flight."""

    def __init__(self) -> None:
        self.present: dict[tuple[int, int], bytes] = {}  # acknowledged set, no delete sent
        self.deleted: set[tuple[int, int]] = set()  # acknowledged delete
        self.unsure: set[tuple[int, int]] = set()  # a request was in flight at the kill
        self.acks = 0


async def writer(address: str, w: int, start: int, ledger: Ledger, stop: asyncio.Event) -> None:
    client = new_client(address)
    i = start
    try:
        while not stop.is_set():
            ident = (w, i)
            value = f"w{w}-{i}".encode()
            ledger.unsure.add(ident)
            await client.stores_set(Keys=[pb.StoresKey(Floats=key_of(w, i))], Values=[pb.StoresValue(Bytes=value)])
            ledger.unsure.discard(ident)
            ledger.present[ident] = value
            ledger.acks += 1
            if i % 4 == 0:  # delete every fourth key once its set is acknowledged
                del ledger.present[ident]
                ledger.unsure.add(ident)
                await client.stores_delete(Keys=[pb.StoresKey(Floats=key_of(w, i))])
                ledger.unsure.discard(ident)
                ledger.deleted.add(ident)
                ledger.acks += 1
            i += 1
    except RpcError:
        pass  # the server died under us: this request's fate is unknown (it stays in `unsure`)
    finally:
        await client.close()


async def wait_ready(address: str) -> None:
    client = new_client(address)
    try:
        for _ in range(200):
            status = await client.status()
            if status.state == pb.StatusResponse.State.READY:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("store never became READY")
    finally:
        await client.close()


async def verify(address: str, ledger: Ledger) -> None:
    client = new_client(address)
    try:
        def keys(idents: list[tuple[int, int]]) -> list[pb.StoresKey]:
            return [pb.StoresKey(Floats=key_of(*ident)) for ident in idents]

        present = sorted(ledger.present)
        for s in range(0, len(present), 500):
            batch = present[s : s + 500]
            got = await client.stores_get(Keys=keys(batch))
            found = {bytes(v.Bytes) for v in got.Values}
            missing = [ident for ident in batch if ledger.present[ident] not in found]
            assert not missing, f"acknowledged sets lost after kill -9: {missing[:5]} ({len(missing)})"
        gone = sorted(ledger.deleted)
        if gone:
            got = await client.stores_get(Keys=keys(gone))
            assert len(got.Keys) == 0, "acknowledged deletes came back after kill -9"
        # in-flight writes: either applied whole or not at all
        for ident in ledger.unsure:
            got = await client.stores_get(Keys=keys([ident]))
            assert [v.Bytes for v in got.Values] in ([], [f"w{ident[0]}-{ident[1]}".encode()])
    finally:
        await client.close()


@pytest.mark.timeout(120)
async def test_no_acknowledged_write_is_lost_to_kill_9(tmp_path: Path) -> None:
    args = ("--backend", "local-store", "--store-path", str(tmp_path), "--model", "store://dur",
            "--model-options", OPTIONS)
    ledger = Ledger()
    next_i = 0
    for _round in range(2):
        with spawned_server(*args) as (proc, address):
            await wait_ready(address)
            await verify(address, ledger)  # everything from the previous round survived
            stop = asyncio.Event()
            tasks = [asyncio.create_task(writer(address, w, next_i, ledger, stop)) for w in range(4)]
            target = ledger.acks + 250
            while ledger.acks < target:
                await asyncio.sleep(0.005)
                assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            proc.send_signal(signal.SIGKILL)  # mid-write: four writers have requests in flight
            proc.wait(10)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            next_i += 100_000 // 8
    with spawned_server(*args) as (proc, address):
        await wait_ready(address)
        await verify(address, ledger)
    store_dir = tmp_path / "s_dur"
    names = sorted(p.name for p in store_dir.iterdir())
    assert any(n.startswith("snapshot-") for n in names), names  # compaction ran during the writes
    assert len(ledger.present) > 200 and len(ledger.deleted) > 50
