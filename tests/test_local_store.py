"""local-store: LocalAI local-store semantics, bad inputs, durability files, ANN.

The semantic cases mirror LocalAI's backend/go/local-store/store_test.go and run both
against the engine directly and through a real gRPC server.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from inferd.backends.local_store import LocalStoreBackend, parse_options, store_dirname, store_name
from inferd.client import RpcError, new_client
from inferd.engines.store import StoreConfig, VectorStore
from inferd.errors import InvalidArgument, LoadError
from inferd.proto import backend_pb2 as pb
from tests import helpers
from tests.helpers import running_server


def keys(*vectors: list[float]) -> list[pb.StoresKey]:
    return [pb.StoresKey(Floats=v) for v in vectors]


def values(*items: bytes) -> list[pb.StoresValue]:
    return [pb.StoresValue(Bytes=b) for b in items]


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [float(np.float32(x / n)) for x in v]


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Embedding-like data: points around 50 centres in a 16-d subspace (ANN-friendly)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((16, dim))
    centres = rng.standard_normal((50, 16)) * 3
    x = (centres[rng.integers(0, 50, n)] + rng.standard_normal((n, 16))) @ basis
    x += 0.1 * rng.standard_normal((n, dim))
    return x.astype(np.float32)


# ---- the engine directly -----------------------------------------------------------------
def test_engine_set_get_overwrite_delete_find() -> None:
    s = VectorStore()
    s.set([[0.3, 0, 0], [0.1, 0, 0]], [b"c", b"a"])
    s.set([[0.2, 0, 0], [0.1, 0, 0]], [b"b", b"a-updated"])  # upsert (LocalAI: "merges sorted and updates")
    assert len(s) == 3
    ks, vs = s.get([[0.1, 0, 0], [0.9, 0, 0]])  # missing keys are omitted, not an error
    assert vs == [b"a-updated"] and ks.tolist() == [[np.float32(0.1), 0, 0]]
    ks, vs = s.get([[0.3, 0, 0], [0.1, 0, 0], [0.2, 0, 0]])
    assert vs == [b"a-updated", b"b", b"c"]  # ascending key order, as LocalAI's sorted store
    assert s.delete([[0.2, 0, 0], [0.9, 0, 0]]) == 1  # missing keys tolerated
    assert len(s) == 2 and s.get([[0.2, 0, 0]])[1] == []
    assert s.stats()["value_bytes"] == len(b"a-updated") + len(b"c")


def test_engine_find_topk_sorted_with_similarities() -> None:
    s = VectorStore()
    s.set([unit([1, 0, 0]), unit([0, 1, 0]), unit([0, 0, 1])], [b"x", b"y", b"z"])
    r = s.find(unit([0.9, 0.1, 0]), 2)
    assert r.values == [b"x", b"y"]
    assert r.similarities[0] >= r.similarities[1]
    assert r.similarities[0] == pytest.approx(0.9 / math.sqrt(0.82), abs=1e-6)
    assert s.find(unit([1, 0, 0]), 10).values[0] == b"x"  # topK larger than the store
    assert len(s.find(unit([1, 0, 0]), 10).values) == 3


def test_engine_find_non_normalized_keys_uses_cosine() -> None:
    s = VectorStore()
    s.set([[2, 0, 0], [0, 3, 0], [1, 1, 0]], [b"x", b"y", b"xy"])
    r = s.find([4, 0, 0], 3)
    assert r.values == [b"x", b"xy", b"y"]
    assert r.similarities.tolist() == pytest.approx([1.0, math.sqrt(0.5), 0.0], abs=1e-6)
    assert r.keys[0].tolist() == [2, 0, 0]  # the stored key, not its normalised form


def test_engine_dimension_rules() -> None:
    s = VectorStore()
    s.set([[1, 0, 0]], [b"3d"])
    with pytest.raises(InvalidArgument) as e:
        s.set([[1, 0]], [b"2d"])
    assert e.value.field == "Keys"
    with pytest.raises(InvalidArgument):
        s.set([[1, 0, 0], [1, 0]], [b"a", b"b"])  # mixed dimensions within a batch
    with pytest.raises(InvalidArgument):
        s.find([1, 0], 1)
    with pytest.raises(InvalidArgument):
        s.get([[1, 0]])
    with pytest.raises(InvalidArgument):
        s.delete([[1, 0]])
    s.set([[0, 1, 0]], [b"y"])
    s.delete([[1, 0, 0]])
    with pytest.raises(InvalidArgument):  # a partial delete keeps the dimension
        s.set([[1, 0]], [b"2d"])
    s.delete([[0, 1, 0]])
    assert len(s) == 0
    s.set([unit([1, 1])], [b"2d"])  # empty again: the dimension reopens
    assert s.find(unit([1, 1]), 1).values == [b"2d"]


def test_engine_bad_inputs_name_the_field() -> None:
    s = VectorStore()
    cases = [
        (lambda: s.set([], []), "Keys"),
        (lambda: s.set([[1, 0]], [b"a", b"b"]), "Values"),
        (lambda: s.set([[1, 0], [float("nan"), 1]], [b"a", b"b"]), "Keys[1]"),
        (lambda: s.set([[float("inf"), 1]], [b"a"]), "Keys[0]"),
        (lambda: s.set([[1, 0], [0, 0]], [b"a", b"b"]), "Keys[1]"),
        (lambda: s.delete([]), "Keys"),
        (lambda: s.find([1, 0], 0), "TopK"),
        (lambda: s.find([1, 0], -3), "TopK"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.field == field, (field, e.value)
    assert len(s) == 0  # nothing was half-applied
    assert s.find([1, 0], 5).values == []  # empty store: empty result, no error
    s.set([[1, 0]], [b"a"])
    for q, field in (([0, 0], "Key"), ([float("nan"), 0], "Key")):
        with pytest.raises(InvalidArgument) as e:
            s.find(q, 1)
        assert e.value.field == field


def test_engine_minus_zero_is_the_same_key_and_batch_repeats_keep_last() -> None:
    s = VectorStore()
    s.set([[-0.0, 1.0], [0.0, 1.0]], [b"first", b"second"])
    assert len(s) == 1 and s.get([[0.0, 1.0]])[1] == [b"second"]
    assert s.get([[-0.0, 1.0]])[1] == [b"second"]


# ---- durability files ----------------------------------------------------------------------
def test_durable_reopen_and_torn_tail(tmp_path: Path) -> None:
    s = VectorStore(tmp_path)
    rng = np.random.default_rng(1)
    k = rng.standard_normal((50, 8)).astype(np.float32)
    for i in range(50):
        s.set(k[i : i + 1], [f"v{i}".encode()])
    s.delete(k[:10])
    s.set(k[10:11], [b"overwritten"])
    s.close()
    wal = tmp_path / "wal-00000000.log"
    size = wal.stat().st_size
    with open(wal, "ab") as f:  # a record cut short by a crash: header promises more bytes
        f.write((500).to_bytes(4, "little") + b"\x00\x00\x00\x00partial")
    s = VectorStore(tmp_path)
    assert len(s) == 40
    assert sorted(s.get(k[10:12])[1]) == [b"overwritten", b"v11"]
    assert s.get(k[:10])[1] == []
    assert wal.stat().st_size == size  # the torn bytes were cut off ...
    assert (tmp_path / "wal-00000000.log.torn").exists()  # ... and kept aside
    s.set(k[:1], [b"after"])  # appends after the cut are readable
    s.close()
    s = VectorStore(tmp_path)
    assert s.get(k[:1])[1] == [b"after"] and len(s) == 41
    s.close()


def test_durable_compaction_keeps_data(tmp_path: Path) -> None:
    cfg = StoreConfig(compact_bytes=4096, compact_ratio=0.5)
    s = VectorStore(tmp_path, cfg)
    rng = np.random.default_rng(2)
    k = rng.standard_normal((300, 16)).astype(np.float32)
    for i in range(0, 300, 3):
        s.set(k[i : i + 3], [f"v{j}".encode() for j in range(i, i + 3)])
    s.delete(k[:30])
    gen = s.stats()["generation"]
    assert gen >= 2, s.stats()
    s.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["LOCK", f"snapshot-{gen:08d}.bin", f"wal-{gen:08d}.log"], files
    s = VectorStore(tmp_path, cfg)
    assert len(s) == 270
    got_k, got_v = s.get(k[25:40])
    assert len(got_v) == 10 and {v.decode() for v in got_v} == {f"v{j}" for j in range(30, 40)}
    r = s.find(k[100], 1)
    assert r.values == [b"v100"] and r.similarities[0] == pytest.approx(1.0, abs=1e-6)
    s.close()


def test_interrupted_compaction_leftovers(tmp_path: Path) -> None:
    s = VectorStore(tmp_path)
    k = np.random.default_rng(3).standard_normal((20, 4)).astype(np.float32)
    s.set(k[:10], [b"%d" % i for i in range(10)])
    s.compact()
    s.close()
    # crash after the new snapshot was renamed in, before its log was created, with the
    # old generation's files and a half-written next snapshot still around
    (tmp_path / "wal-00000001.log").unlink()
    (tmp_path / "wal-00000000.log").write_bytes(b"INFWAL01 stale")
    (tmp_path / "snapshot-00000002.bin.tmp").write_bytes(b"half")
    s = VectorStore(tmp_path)
    assert len(s) == 10 and s.get(k[:1])[1] == [b"0"]
    s.set(k[10:], [b"x"] * 10)
    s.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK", "snapshot-00000001.bin", "wal-00000001.log"]
    s = VectorStore(tmp_path)
    assert len(s) == 20
    s.close()
    # a corrupted snapshot is refused, not served as an empty store
    snap = tmp_path / "snapshot-00000001.bin"
    data = bytearray(snap.read_bytes())
    data[40] ^= 0xFF
    snap.write_bytes(bytes(data))
    from inferd.engines.store import StoreCorrupt

    with pytest.raises(StoreCorrupt, match="checksum"):
        VectorStore(tmp_path)


def test_store_directory_is_locked(tmp_path: Path) -> None:
    from inferd.engines.store import StoreCorrupt

    s = VectorStore(tmp_path)
    with pytest.raises(StoreCorrupt, match="in use"):
        VectorStore(tmp_path)
    s.close()
    VectorStore(tmp_path).close()


# ---- ANN ---------------------------------------------------------------------------------
def ann_config(**kw: object) -> StoreConfig:
    base = dict(ann_threshold=1500, ann_background=False, ann_time_ratio=1e9, ann_probe_size=0, ann_build_nice=0)
    base.update(kw)
    return StoreConfig(**base)  # type: ignore[arg-type]


def test_ann_recall_deletes_and_overwrites() -> None:
    pytest.importorskip("hnswlib")
    data = clustered(3060, 32)
    data, queries = data[:3000], data[3000:]  # same distribution, not stored
    s = VectorStore(None, ann_config())
    s.set(data, [str(i).encode() for i in range(len(data))])
    st = s.stats()
    assert st["ann_ef"] is not None, st  # calibrated on this data
    hits = 0
    for q in queries:
        a = s.find(q, 10)
        e = s.exact_find(q, 10)
        assert a.method == "ann" and e.method == "exact"
        hits += len(set(a.values) & set(e.values))
        assert list(a.similarities) == sorted(a.similarities, reverse=True)
    assert hits / (10 * len(queries)) >= 0.98
    # a deleted key is never returned; an overwritten value is
    q = queries[0]
    top = s.find(q, 3)
    s.delete(top.keys[:1])
    again = s.find(q, 3)
    assert top.values[0] not in again.values and again.method == "ann"
    s.set(again.keys[:1], [b"new value"])
    assert s.find(q, 1).values == [b"new value"]
    # new keys are searchable at once
    fresh = queries[:5]
    s.set(fresh, [b"f%d" % i for i in range(5)])
    for i, f in enumerate(fresh):
        r = s.find(f, 1)
        assert r.values == [b"f%d" % i] and r.method == "ann", (i, r)


def test_ann_background_build_catches_up_with_writes() -> None:
    pytest.importorskip("hnswlib")
    data = clustered(2600, 24, seed=3)
    s = VectorStore(None, ann_config(ann_threshold=2000, ann_background=True))
    s.set(data[:2000], [str(i).encode() for i in range(2000)])  # starts the build
    s.set(data[2000:], [str(i).encode() for i in range(2000, 2600)])  # written during it
    s.delete(data[:100])
    assert s.wait_for_index(60)
    assert s.stats()["ann_ef"] is not None, s.stats()
    for i in list(range(100, 2600, 97)):
        r = s.find(data[i], 1)
        assert r.values == [str(i).encode()], (i, r.method)
    for i in range(0, 100, 9):
        assert str(i).encode() not in s.find(data[i], 5).values


def test_ann_kept_off_when_it_cannot_reach_the_recall() -> None:
    pytest.importorskip("hnswlib")
    rng = np.random.default_rng(5)
    data = rng.standard_normal((3000, 64)).astype(np.float32)  # random: the worst case
    s = VectorStore(None, ann_config(ann_recall=0.999999, ann_m=4, ann_ef_construction=16))
    s.set(data, [b"x"] * len(data))
    assert s.stats()["ann_ef"] is None and "exact scan kept" in s.stats()["ann"]
    assert s.find(data[7], 1).method == "exact"


# ---- backend: names and options ------------------------------------------------------------------
def test_store_names_and_dirs() -> None:
    assert store_name("store://faces") == "faces"
    assert store_name("store://") == ""
    assert store_name("") == ""  # older LocalAI: raw name, "" by default
    assert store_name("faces") == "faces"
    for bad in ("some-llm.gguf", "models/x", "/abs/path", "m.safetensors"):
        with pytest.raises(LoadError, match="not a store namespace"):
            store_name(bad)
    assert store_dirname("") == "_default"
    assert store_dirname("../x") == "s_..%2Fx" and "/" not in store_dirname("a/b")
    assert store_dirname("default") != store_dirname("")
    assert len(store_dirname("n" * 1000)) < 100


def test_parse_options() -> None:
    cfg = parse_options(["ann:off", "compact_bytes=1000", "qdrant_url:http://x"])
    assert cfg.ann == "off" and cfg.compact_bytes == 1000
    with pytest.raises(LoadError):
        parse_options(["ann_threshold:lots"])
    with pytest.raises(LoadError):
        parse_options(["ann:faiss"])


# ---- backend through a real server --------------------------------------------------------------
async def test_server_semantics_like_localai() -> None:
    async with running_server(LocalStoreBackend()) as server:
        c = new_client(f"127.0.0.1:{server.port}")
        try:
            # Stores work before LoadModel (LocalAI's store exists from process start).
            assert (await c.stores_find(Key=pb.StoresKey(Floats=[1, 0, 0]), TopK=5)).Keys == []
            res = await c.load_model(Model="store://test")
            assert res.success, res.message
            await c.stores_set(Keys=keys([0.3, 0, 0], [0.1, 0, 0]), Values=values(b"c", b"a"))
            r = await c.stores_set(Keys=keys([0.2, 0, 0], [0.1, 0, 0]), Values=values(b"b", b"a2"))
            assert r.success
            got = await c.stores_get(Keys=keys([0.1, 0, 0], [0.9, 0, 0], [0.3, 0, 0]))
            assert [v.Bytes for v in got.Values] == [b"a2", b"c"] and len(got.Keys) == 2
            assert list(got.Keys[0].Floats) == [pytest.approx(0.1)] + [0, 0]
            await c.stores_delete(Keys=keys([0.2, 0, 0], [0.7, 0, 0]))
            await c.stores_set(Keys=keys(unit([1, 1, 0]), [0, 0, 2]), Values=values(b"xy", b"z"))
            f = await c.stores_find(Key=pb.StoresKey(Floats=[1, 0, 0]), TopK=3)
            assert [v.Bytes for v in f.Values][:2] in ([b"c", b"a2"], [b"a2", b"c"])
            assert [v.Bytes for v in f.Values][2] == b"xy"
            assert list(f.Similarities) == pytest.approx([1.0, 1.0, math.sqrt(0.5)], abs=1e-6)
            assert len(f.Keys) == 3 and len(f.Similarities) == 3
        finally:
            await c.close()


BAD_CALLS = [
    ("stores_set", dict(Keys=[], Values=[]), "Keys"),
    ("stores_set", dict(Keys=keys([1, 0, 0]), Values=values(b"a", b"b")), "Values"),
    ("stores_set", dict(Keys=keys([1, 0]), Values=values(b"a")), "Keys"),  # dimension mismatch
    ("stores_set", dict(Keys=keys([1, 0, 0], [1, 0]), Values=values(b"a", b"b")), "Keys"),
    ("stores_set", dict(Keys=keys([float("nan"), 0, 0]), Values=values(b"a")), "Keys[0]"),
    ("stores_set", dict(Keys=keys([1, 0, 0], [0, float("-inf"), 0]), Values=values(b"a", b"b")), "Keys[1]"),
    ("stores_set", dict(Keys=keys([0, 0, 0]), Values=values(b"a")), "Keys[0]"),
    ("stores_delete", dict(Keys=[]), "Keys"),
    ("stores_delete", dict(Keys=keys([1, 0])), "Keys"),
    ("stores_get", dict(Keys=keys([1, 0])), "Keys"),
    ("stores_find", dict(Key=pb.StoresKey(Floats=[1, 0, 0]), TopK=0), "TopK"),
    ("stores_find", dict(Key=pb.StoresKey(Floats=[1, 0, 0]), TopK=-1), "TopK"),
    ("stores_find", dict(Key=pb.StoresKey(Floats=[1, 0]), TopK=1), "Key"),
    ("stores_find", dict(Key=pb.StoresKey(Floats=[0, 0, 0]), TopK=1), "Key"),
    ("stores_find", dict(Key=pb.StoresKey(Floats=[float("nan"), 0, 0]), TopK=1), "Key"),
]


async def test_server_bad_inputs_are_invalid_argument() -> None:
    async with running_server(LocalStoreBackend()) as server:
        c = new_client(f"127.0.0.1:{server.port}")
        try:
            assert (await c.load_model(Model="store://")).success
            await c.stores_set(Keys=keys([0, 1, 0]), Values=values(b"seed"))
            for method, kwargs, field in BAD_CALLS:
                with pytest.raises(RpcError) as e:
                    await getattr(c, method)(**kwargs)
                assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, (method, kwargs, e.value)
                assert e.value.details.startswith(field + ":"), (method, e.value.details)
            got = await c.stores_get(Keys=keys([0, 1, 0], [1, 0, 0]))
            assert [v.Bytes for v in got.Values] == [b"seed"]  # nothing half-applied
            # Get with no keys is an empty answer (LocalAI), not an error
            assert (await c.stores_get(Keys=[])).Keys == []
        finally:
            await c.close()


async def test_server_refuses_model_names_and_reports_load() -> None:
    async with running_server(LocalStoreBackend()) as server:
        c = new_client(f"127.0.0.1:{server.port}")
        try:
            res = await c.load_model(Model="qwen-7b.gguf")
            assert not res.success and "not a store namespace" in res.message
            assert (await c.load_model(Model="")).success  # older LocalAI's default
        finally:
            await c.close()


async def test_server_durable_named_stores_are_separate(tmp_path: Path) -> None:
    settings = helpers.test_settings(store_path=str(tmp_path))
    backend = LocalStoreBackend(settings)
    async with running_server(backend, store_path=str(tmp_path)) as server:
        c = new_client(f"127.0.0.1:{server.port}")
        try:
            assert (await c.load_model(Model="store://faces")).success
            await c.stores_set(Keys=keys([1, 0, 0, 0]), Values=values(b"face"))
            # another namespace: its own directory, its own dimension
            res = await c.load_model(Model="store://voices")
            assert res.success and "0 entries" in res.message
            await c.stores_set(Keys=keys([1, 0]), Values=values(b"voice"))
            res = await c.load_model(Model="store://faces")
            assert "1 entries" in res.message
            got = await c.stores_get(Keys=keys([1, 0, 0, 0]))
            assert [v.Bytes for v in got.Values] == [b"face"]
            status = await c.status()
            assert status.memory.breakdown["store_entries"] == 1
            # Free closes the store; a durable one comes back with the next LoadModel
            assert (await c.free()).success
            assert (await c.load_model(Model="store://faces")).success
            got = await c.stores_get(Keys=keys([1, 0, 0, 0]))
            assert [v.Bytes for v in got.Values] == [b"face"]
        finally:
            await c.close()
    assert sorted(os.listdir(tmp_path)) == ["s_faces", "s_voices"]


async def test_server_memory_store_is_dropped_by_free() -> None:
    async with running_server(LocalStoreBackend()) as server:
        c = new_client(f"127.0.0.1:{server.port}")
        try:
            assert (await c.load_model(Model="store://m")).success
            await c.stores_set(Keys=keys([1, 2]), Values=values(b"v"))
            assert len((await c.stores_find(Key=pb.StoresKey(Floats=[1, 2]), TopK=1)).Keys) == 1
            assert (await c.free()).success
            assert (await c.load_model(Model="store://m")).success
            assert len((await c.stores_find(Key=pb.StoresKey(Floats=[1, 2]), TopK=1)).Keys) == 0
        finally:
            await c.close()
