"""local-store: exactly symmetric similarities and an exact (certified) int8 scan.

Similarity symmetry (issue 10, defect 5): a Find from ``a`` that returns ``b`` and a Find
from ``b`` that returns ``a`` must report the identical float32 similarity, and a Find from
``-a`` its exact negation; checked on the engine for both scan kinds and over gRPC.

Exactness (issue 11): the int8 scan only proposes candidates; the answer must be the true
top-k under the store's own similarity, compared here with a float64 brute force.
"""

from __future__ import annotations

import numpy as np
import pytest

from inferd.backends.local_store import LocalStoreBackend
from inferd.client import new_client
from inferd.engines.store import StoreConfig, VectorStore
from inferd.engines.store import similarity as sim_mod
from inferd.engines.store.scan import exact_top_k, quantize, simsimd_module
from inferd.proto import backend_pb2 as pb
from tests.helpers import running_server

SCANS = ["int8", "float32"]


def needs_simsimd(scan: str) -> None:
    if scan == "int8" and simsimd_module() is None:
        pytest.skip("simsimd is not installed (pip install 'inferd[store]')")


def clustered(n: int, dim: int, seed: int = 0, spread: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    x = centres[rng.integers(0, 20, n)] + spread * rng.standard_normal((n, dim))
    return x.astype(np.float32)


def unit_rows(keys: np.ndarray) -> np.ndarray:
    u = keys.astype(np.float64)
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def brute_force(units: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    """Reference top-k in float64 over unit keys (ties broken by insertion order, as the store does)."""
    q = query.astype(np.float64) / np.linalg.norm(query.astype(np.float64))
    s = units @ q
    top = np.argpartition(-s, k)[: k + 1] if k < len(s) else np.arange(len(s))
    return top[np.lexsort((top, -s[top]))][:k].tolist()


def sims_by_value(result) -> dict[bytes, float]:
    return dict(zip(result.values, result.similarities.tolist(), strict=True))


# ---- symmetry -------------------------------------------------------------------------------
@pytest.mark.parametrize("scan", SCANS)
def test_similarity_is_exactly_symmetric_and_negation_is_exact(scan: str) -> None:
    needs_simsimd(scan)
    rng = np.random.default_rng(7)
    # Unnormalised keys of varied scale: each side's norm must come from the same code.
    data = rng.standard_normal((600, 384)).astype(np.float32) * rng.uniform(0.01, 50, (600, 1)).astype(np.float32)
    s = VectorStore(None, StoreConfig(scan=scan, ann="off"))
    s.set(data, [b"%d" % i for i in range(len(data))])
    everything = {i: sims_by_value(s.find(data[i], len(data))) for i in range(40)}
    checked = 0
    for i in range(40):
        for j in range(40):
            if i != j:
                assert everything[i][b"%d" % j] == everything[j][b"%d" % i], (i, j)
                checked += 1
        negated = sims_by_value(s.find(-data[i], len(data)))
        assert all(negated[v] == -x for v, x in everything[i].items()), i
    assert checked == 40 * 39
    # a top-k Find (candidates re-scored) reports the same numbers as the full ranking
    top = s.find(data[0], 5)
    assert all(everything[0][v] == x for v, x in sims_by_value(top).items())


def test_pairwise_arithmetic_is_order_independent() -> None:
    """The fixed-order sum gives the same bits for a row alone or inside any batch or layout."""
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((300, 257)).astype(np.float32)
    norms = sim_mod.norms(keys)
    assert np.array_equal(norms[17:18], sim_mod.norms(keys[17:18]))
    assert np.array_equal(norms[::-1], sim_mod.norms(np.ascontiguousarray(keys[::-1])))
    q = sim_mod.unit(keys[5:6], norms[5:6])[0]
    a = sim_mod.cosine_rows(keys, norms, q)
    for j in (0, 99, 299):
        back = sim_mod.cosine_rows(keys[5:6], norms[5:6], sim_mod.unit(keys[j : j + 1], norms[j : j + 1])[0])
        assert a[j] == back[0]


async def test_symmetry_over_grpc() -> None:
    rng = np.random.default_rng(11)
    data = rng.standard_normal((300, 64)).astype(np.float32)
    async with running_server(LocalStoreBackend()) as server:
        c = new_client(f"127.0.0.1:{server.port}")
        try:
            assert (await c.load_model(Model="store://sym")).success
            await c.stores_set(Keys=[pb.StoresKey(Floats=r) for r in data.tolist()],
                               Values=[pb.StoresValue(Bytes=b"%d" % i) for i in range(len(data))])

            async def find(vec: np.ndarray) -> dict[bytes, float]:
                r = await c.stores_find(Key=pb.StoresKey(Floats=vec.tolist()), TopK=len(data))
                return {bytes(v.Bytes): s for v, s in zip(r.Values, r.Similarities, strict=True)}

            rows = [await find(data[i]) for i in range(12)]
            for i in range(12):
                for j in range(12):
                    assert rows[i][b"%d" % j] == rows[j][b"%d" % i], (i, j)
                neg = await find(-data[i])
                assert all(neg[v] == -x for v, x in rows[i].items())
        finally:
            await c.close()


# ---- exactness of the scan ----------------------------------------------------------------------
@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_find_is_the_exact_top_k(scan: str, kind: str) -> None:
    needs_simsimd(scan)
    rng = np.random.default_rng(5)
    n, dim = 20_000, 96
    data = rng.standard_normal((n, dim)).astype(np.float32) if kind == "random" else clustered(n, dim)
    s = VectorStore(None, StoreConfig(scan=scan, ann="off"))
    s.set(data, [b"%d" % i for i in range(n)])
    assert s.scan_kind == scan
    units = unit_rows(data)
    queries = np.concatenate([data[:10] + 0.01, rng.standard_normal((10, dim)).astype(np.float32)])
    for q in queries:
        for k in (1, 10, 100):
            got = [int(v) for v in s.find(q, k).values]
            assert got == brute_force(units, q, k), (kind, k)


def test_certification_rescans_rows_within_the_bound() -> None:
    """Many near-ties (all keys within the int8 error of each other): the first candidates
    cannot prove the answer, so the second pass must find the true top-k anyway."""
    rng = np.random.default_rng(9)
    base = rng.standard_normal(128)
    data = (base + 1e-3 * rng.standard_normal((5000, 128))).astype(np.float32)
    calls: list[int] = []
    keys = data.astype(np.float64)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    q = keys[0]
    exact = keys @ q
    codes, step, err = quantize(keys)
    q_codes, q_step, q_err = quantize(q.reshape(1, -1))
    approx = (codes.astype(np.int64) @ q_codes[0].astype(np.int64)) * step * q_step[0]
    bound = float(err.max()) * (1 + q_err[0]) + q_err[0]
    assert np.all(np.abs(approx - exact) <= bound)  # the error bound holds on every row

    def rescore(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return exact[rows]

    rows, sims = exact_top_k(approx, bound, 10, rescore)
    assert len(calls) == 2 and calls[1] > 0  # the second pass ran
    top = rows[np.argsort(-sims, kind="stable")][:10]
    assert set(top.tolist()) == set(np.argsort(-exact)[:10].tolist())
    if simsimd_module() is not None:
        s = VectorStore(None, StoreConfig(ann="off"))
        s.set(data, [b"%d" % i for i in range(len(data))])
        assert [int(v) for v in s.find(data[0], 10).values] == brute_force(unit_rows(data), data[0], 10)


def test_simsimd_int8_dot_is_exact_integer_arithmetic() -> None:
    simsimd = simsimd_module()
    if simsimd is None:
        pytest.skip("simsimd is not installed (pip install 'inferd[store]')")
    rng = np.random.default_rng(1)
    a = rng.integers(-127, 128, (50, 384), dtype=np.int8)
    b = rng.integers(-127, 128, (1, 384), dtype=np.int8)
    got = np.asarray(simsimd.cdist(b, a, metric="dot"))[0]
    assert np.array_equal(got, a.astype(np.int64) @ b[0].astype(np.int64))
