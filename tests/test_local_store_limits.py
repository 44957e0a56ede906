"""local-store: hostile sizes and values, option bounds, INFERD_MODELS_DIR confinement, and a
full or read-only store directory (a clear error, acknowledged writes intact)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from inferd.backends.local_store import LocalStoreBackend, parse_options
from inferd.client import RpcError, new_client
from inferd.engines.store import VectorStore
from inferd.engines.store.validation import MAX_DIM, MAX_TOP_K
from inferd.errors import FailedPrecondition, InvalidArgument
from inferd.proto import backend_pb2 as pb
from tests import helpers
from tests.helpers import running_server


def key(*v: float) -> pb.StoresKey:
    return pb.StoresKey(Floats=list(v))


async def expect(code: grpc.StatusCode, field_or_text: str, call) -> str:
    with pytest.raises(RpcError) as e:
        await call
    assert e.value.code == code, e.value
    assert field_or_text in e.value.details, e.value.details
    return e.value.details


async def test_hostile_sizes_over_grpc() -> None:
    async with running_server(LocalStoreBackend(helpers.test_settings(max_message_size=1 << 20)),
                              max_message_size=1 << 20) as server:
        c = new_client(f"127.0.0.1:{server.port}")
        try:
            INV = grpc.StatusCode.INVALID_ARGUMENT
            # a key wider than MAX_DIM, on an empty store (any dimension would otherwise open it)
            wide = pb.StoresKey(Floats=[1.0] * (MAX_DIM + 1))
            await expect(INV, "Keys:", c.stores_set(Keys=[wide], Values=[pb.StoresValue(Bytes=b"x")]))
            await expect(INV, "Key:", c.stores_find(Key=key(float("inf"), 1), TopK=1))
            rng = np.random.default_rng(0)
            data = rng.standard_normal((3000, 32)).astype(np.float32)
            for part in np.split(data, 3):
                await c.stores_set(Keys=[pb.StoresKey(Floats=r) for r in part.tolist()],
                                   Values=[pb.StoresValue(Bytes=b"v" * 300) for _ in range(len(part))])
            q = pb.StoresKey(Floats=data[0].tolist())
            await expect(INV, "TopK:", c.stores_find(Key=q, TopK=2**31 - 1))
            await expect(INV, f"between 1 and {MAX_TOP_K}", c.stores_find(Key=q, TopK=MAX_TOP_K + 1))
            # every entry fits the reply limit by count but not by size: refused, naming TopK
            text = await expect(INV, "TopK:", c.stores_find(Key=q, TopK=3000))
            assert "message limit" in text
            assert len((await c.stores_find(Key=q, TopK=100)).Keys) == 100  # a reply that fits
            await expect(INV, "Key:", c.stores_find(Key=key(*([float("nan")] * 32)), TopK=1))
            await expect(INV, "Keys[1]:", c.stores_delete(Keys=[q, key(*([0.0] * 31), float("inf"))]))
            assert (await c.health()).message == b"OK"
        finally:
            await c.close()


def test_option_bounds() -> None:
    for raw, field in (("ann_m:1000000000", "Options.ann_m"), ("scan_threads:100000", "Options.scan_threads"),
                       ("ann_build_nice:40", "Options.ann_build_nice"), ("ann_recall:nan", "Options.ann_recall"),
                       ("ann_ef_construction:1", "Options.ann_ef_construction"),
                       ("ann_max_topk:0", "Options.ann_max_topk")):
        with pytest.raises(InvalidArgument) as e:
            parse_options([raw])
        assert e.value.field == field, raw
    cfg = parse_options(["scan:float32", "ann_build_threads:2", "ann_probe_size:0"])
    assert (cfg.scan, cfg.ann_build_threads, cfg.ann_probe_size) == ("float32", 2, 0)


async def test_load_refuses_absurd_options() -> None:
    async with running_server(LocalStoreBackend()) as server:
        c = new_client(f"127.0.0.1:{server.port}")
        try:
            res = await c.load_model(Model="store://x", Options=["ann_m:1000000000"])
            assert not res.success and "Options.ann_m" in res.message
            assert (await c.load_model(Model="store://x", Options=["scan:float32"])).success
        finally:
            await c.close()


async def test_store_paths_confined_to_models_dir(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    async def load(store_path: str, name: str) -> pb.Result:
        settings = helpers.test_settings(store_path=store_path, models_dir=str(models))
        async with running_server(LocalStoreBackend(settings), store_path=store_path,
                                  models_dir=str(models)) as server:
            c = new_client(f"127.0.0.1:{server.port}")
            try:
                return await c.load_model(Model=f"store://{name}")
            finally:
                await c.close()

    res = await load(str(outside), "a")
    assert not res.success and "outside INFERD_MODELS_DIR" in res.message
    res = await load(str(models / ".." / "elsewhere"), "a")
    assert not res.success and "outside INFERD_MODELS_DIR" in res.message
    (models / "stores").mkdir()
    os.symlink(outside, models / "stores" / "s_link")  # the store's own directory points out
    res = await load("stores", "link")
    assert not res.success and "outside INFERD_MODELS_DIR" in res.message
    res = await load("stores", "inside")  # relative to the models dir
    assert res.success, res.message
    assert (models / "stores" / "s_inside" / "LOCK").exists()
    assert list(outside.iterdir()) == []


# ---- a full or read-only store directory ----------------------------------------------------
def vec(i: int) -> list[float]:
    return np.random.default_rng(i).standard_normal(16).astype(np.float32).tolist()


async def test_full_disk_refuses_the_write_and_keeps_acknowledged_ones(tmp_path: Path) -> None:
    """A real kernel limit (RLIMIT_FSIZE via prlimit: writes past it fail with EFBIG, as on a
    full disk) on a real server: the failing Set answers RESOURCE_EXHAUSTED, nothing of it is
    applied, earlier writes stay readable, and a restart without the limit finds them all."""
    args = ["serve", "--host", "127.0.0.1", "--backend", "local-store", "--store-path", str(tmp_path),
            "--model", "store://full", "--model-options", json.dumps({"Options": ["compact_bytes:2048"]})]
    port = helpers.free_port()
    cmd = ["prlimit", f"--fsize={8 * 1024}", sys.executable, "-m", "inferd.cli", *args, "--port", str(port)]
    proc = helpers.start_listening(cmd, helpers.inferd_env())
    acked: list[int] = []
    try:
        c = new_client(f"127.0.0.1:{port}")
        try:
            for _ in range(100):
                if (await c.status()).state == pb.StatusResponse.State.READY:
                    break
                await asyncio.sleep(0.05)
            error = None
            for i in range(2000):
                try:
                    await c.stores_set(Keys=[pb.StoresKey(Floats=vec(i))], Values=[pb.StoresValue(Bytes=b"%d" % i)])
                    acked.append(i)
                except RpcError as exc:
                    error = exc
                    break
            assert error is not None, "the size limit was never hit"
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert "is full" in error.details and "intact" in error.details
            failed = len(acked)
            got = await c.stores_get(Keys=[pb.StoresKey(Floats=vec(failed))])
            assert list(got.Values) == []  # the refused write was not applied
            got = await c.stores_get(Keys=[pb.StoresKey(Floats=vec(i)) for i in acked])
            assert len(got.Values) == len(acked) > 10
            assert (await c.stores_find(Key=pb.StoresKey(Floats=vec(0)), TopK=1)).Values[0].Bytes == b"0"
        finally:
            await c.close()
    finally:
        proc.kill()
        proc.wait(10)
    with helpers.spawned_server(*args[1:]) as (_proc, address):
        c = new_client(address)
        try:
            for _ in range(100):
                if (await c.status()).state == pb.StatusResponse.State.READY:
                    break
                await asyncio.sleep(0.05)
            got = await c.stores_get(Keys=[pb.StoresKey(Floats=vec(i)) for i in acked])
            assert sorted(int(v.Bytes) for v in got.Values) == acked
            await c.stores_set(Keys=[pb.StoresKey(Floats=vec(5000))], Values=[pb.StoresValue(Bytes=b"after")])
        finally:
            await c.close()


@contextlib.contextmanager
def immutable(path: Path):
    """``chattr +i``: the kernel refuses every write to ``path`` (even through descriptors already
    open, even for root) with EPERM, as a read-only remount would (which the kernel refuses while
    the log is open for writing). Needs CAP_LINUX_IMMUTABLE and a filesystem with the flag."""
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make {path} immutable here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_read_only_store_clear_error_and_acknowledged_writes_intact(tmp_path: Path) -> None:
    s = VectorStore(tmp_path / "store")
    for i in range(20):
        s.set([vec(i)], [b"%d" % i])
    log_file = tmp_path / "store" / "wal-00000000.log"
    size = log_file.stat().st_size
    with immutable(log_file):
        with pytest.raises(FailedPrecondition) as e:
            s.set([vec(100)], [b"lost"])
        assert "not writable" in e.value.message and "intact" in e.value.message, e.value.message
        with pytest.raises(FailedPrecondition):
            s.delete([vec(1)])
        assert s.get([vec(100)])[1] == []  # not applied
        assert len(s.get([vec(i) for i in range(20)])[1]) == 20  # reads keep working
        assert s.find(vec(3), 1).values == [b"3"]
        s.close()
    assert log_file.stat().st_size == size
    (tmp_path / "ro").mkdir()
    with immutable(tmp_path / "ro"), pytest.raises(FailedPrecondition, match="not writable"):
        VectorStore(tmp_path / "ro")  # a read-only directory: a clear error at open
    s = VectorStore(tmp_path / "store")
    assert len(s) == 20 and s.get([vec(7)])[1] == [b"7"]
    s.set([vec(100)], [b"back"])
    s.close()
