"""local-store speed: Set throughput, Find p50/p99 (exact and ANN), recall@10, vs plain numpy.

Everything is measured in this run, against a baseline doing the same work with
plain numpy (no store):

* Set: 100k x 384 keys through ``StoresSet`` messages of 1,000 keys (the backend's
  protobuf conversion + the engine), in memory and durable (fsync per call); baseline:
  ``np.array`` of the same Python lists appended to a list (no lookups, no durability).
* Find: p50/p99 per query at each size; ours exact (matrix-vector product on a kept
  float32 matrix + argpartition), ours through the ANN index when its calibration
  accepts it, and the baseline brute force (cosine over the raw keys with the norms
  computed per query, then a full argsort), which is what a store without a kept
  matrix does; also, for reference, our algorithm in plain numpy on a pre-normalised
  matrix with BLAS's default thread count. Ratios are baseline/ours (>1: we are faster).
* recall@10 of the ANN answers against the exact ones, on held-out queries.

Data: ``clustered`` (embedding-like: 200 clusters in a 64-d subspace of R^384 plus
noise; not real embeddings) and ``random`` (unit Gaussian: the worst case for ANN).

    python bench/store.py            # 10k, 100k, 1M exact; ANN at 100k (both data sets); ~3-5 min
    python bench/store.py --quick    # 10k and 100k, fewer queries; ~1 min
    python bench/store.py --full     # also the ANN at 1M (build takes minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from inferd.backends.context import CallContext  # noqa: E402
from inferd.backends.local_store import LocalStoreBackend  # noqa: E402
from inferd.engines.store import StoreConfig, VectorStore  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402
from inferd.settings import Settings  # noqa: E402

DIM = 384


def make_data(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        x = rng.standard_normal((n, DIM), dtype=np.float32)
    else:
        basis = np.random.default_rng(1).standard_normal((64, DIM)).astype(np.float32)
        centres = np.random.default_rng(2).standard_normal((200, 64)).astype(np.float32)
        x = np.empty((n, DIM), dtype=np.float32)
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            lab = rng.integers(0, 200, m)
            part = (centres[lab] + 0.6 * rng.standard_normal((m, 64), dtype=np.float32)) @ basis
            noise = rng.standard_normal((m, DIM), dtype=np.float32)
            part += 0.3 * noise * (np.linalg.norm(part, axis=1, keepdims=True) / np.sqrt(DIM))
            x[s : s + m] = part
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def pct(lat: list[float]) -> tuple[float, float]:
    a = np.array(lat) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def baseline_find(keys: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    sims = (keys @ q) / (np.linalg.norm(keys, axis=1) * np.linalg.norm(q))
    return np.argsort(-sims)[:k]


def bench_set(n: int, batch: int) -> None:
    data = make_data("random", n, 11)
    blobs = []  # serialized requests: every pass parses them afresh, as the server does
    for s in range(0, n, batch):
        rows = data[s : s + batch].tolist()
        blobs.append(pb.StoresSetOptions(
            Keys=[pb.StoresKey(Floats=r) for r in rows],
            Values=[pb.StoresValue(Bytes=b"v%d" % (s + i)) for i in range(len(rows))],
        ).SerializeToString())
    ctx = CallContext("StoresSet")

    def ours(path: str) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings.load([], env={}).with_overrides(store_path=tmp if path else "")
            backend = LocalStoreBackend(settings)
            backend.load(pb.ModelOptions(Model="store://bench", Options=["ann:off"]), ctx)
            t0 = time.perf_counter()
            for blob in blobs:
                backend.stores_set(pb.StoresSetOptions.FromString(blob), ctx)
            secs = time.perf_counter() - t0
            backend.unload()
            return secs

    def baseline() -> float:
        t0 = time.perf_counter()
        chunks = []
        for blob in blobs:
            req = pb.StoresSetOptions.FromString(blob)
            chunks.append(np.array([k.Floats for k in req.Keys], dtype=np.float32))
            _ = [v.Bytes for v in req.Values]
        np.concatenate(chunks)
        return time.perf_counter() - t0

    # Alternating rounds, median of each: machine noise hits all three alike.
    runs: dict[str, list[float]] = {"baseline": [], "memory": [], "durable": []}
    for _ in range(3):
        runs["baseline"].append(baseline())
        runs["memory"].append(ours(""))
        runs["durable"].append(ours("tmp"))
    base = float(np.median(runs["baseline"]))
    results = {k: float(np.median(v)) for k, v in runs.items() if k != "baseline"}
    print(f"\n## Set: {n} x {DIM} keys in StoresSet messages of {batch} (parsing included; median of 3 rounds)")
    print(f"  baseline (parse, protobuf -> numpy, append; no lookups): {n / base:10.0f} keys/s")
    for label, secs in results.items():
        print(f"  ours, {label:8s}: {n / secs:10.0f} keys/s   ({secs:.2f}s; baseline/ours time ratio {base / secs:.2f})")


def bench_find(kind: str, sizes: list[int], ann_sizes: set[int], queries: int, exact: bool) -> None:
    top_k = 10
    cfg = StoreConfig(ann_threshold=10**12, ann_background=False)  # ANN builds only when asked
    store = VectorStore(None, cfg)
    qs = make_data(kind, queries, 999)
    data_parts: list[np.ndarray] = []
    have = 0
    print(f"\n## Find top-{top_k}, data={kind}, {queries} queries per size (p50/p99 ms)")
    for n in sizes:
        part = make_data(kind, n - have, 1000 + n)
        t0 = time.perf_counter()
        for s in range(0, len(part), 10_000):
            store.set(part[s : s + 10_000], [b"%d" % (have + s + i) for i in range(min(10_000, len(part) - s))])
        load_s = time.perf_counter() - t0
        data_parts.append(part)
        have = n
        keys = np.concatenate(data_parts) if len(data_parts) > 1 else data_parts[0]
        data_parts = [keys]
        nq = queries if n <= 100_000 else max(20, queries // 5)
        line = f"  n={n:>9,}  (Set {n / max(load_s, 1e-9):,.0f} keys/s in 10k batches)"
        print(line)
        exact_answers = []
        if exact:
            lat_b: list[float] = []
            for q in qs[: max(10, nq // 4) if n > 100_000 else nq]:
                t0 = time.perf_counter()
                baseline_find(keys, q, top_k)
                lat_b.append(time.perf_counter() - t0)
            # The same algorithm as ours with numpy's defaults (keys already unit length here,
            # BLAS's own thread count): isolates what the kept matrix and one thread buy.
            lat_p: list[float] = []
            for q in qs[:nq]:
                t0 = time.perf_counter()
                sims = keys @ q
                np.argpartition(sims, len(sims) - top_k)[-top_k:]
                lat_p.append(time.perf_counter() - t0)
        lat_e: list[float] = []
        for q in qs[:nq]:
            t0 = time.perf_counter()
            r = store.exact_find(q, top_k)
            lat_e.append(time.perf_counter() - t0)
            exact_answers.append(set(r.values))
        e50, e99 = pct(lat_e)
        if exact:
            b50, b99 = pct(lat_b)
            print(f"    numpy brute force : p50 {b50:8.2f}  p99 {b99:8.2f}")
            p50_, p99_ = pct(lat_p)
            print(f"    numpy pre-normalised matrix, argpartition, default BLAS threads: p50 {p50_:8.2f}  p99 {p99_:8.2f}")
            print(f"    ours exact        : p50 {e50:8.2f}  p99 {e99:8.2f}   baseline/ours p50 {b50 / e50:5.2f}x")
        else:
            print(f"    ours exact        : p50 {e50:8.2f}  p99 {e99:8.2f}")
        if n in ann_sizes:
            # A separate store, so the index does not slow the later (larger) sizes' inserts.
            ann_store = VectorStore(None, cfg)
            for s in range(0, n, 10_000):
                ann_store.set(keys[s : s + 10_000], [b"%d" % (s + i) for i in range(min(10_000, n - s))])
            t0 = time.perf_counter()
            ann_store.build_index_now()
            build_s = time.perf_counter() - t0
            st = ann_store.stats()
            print(f"    ANN build {build_s:.1f}s; calibration: {st['ann']}")
            lat_a: list[float] = []
            hits = 0
            methods = set()
            for q, want in zip(qs[:nq], exact_answers, strict=True):
                t0 = time.perf_counter()
                r = ann_store.find(q, top_k)
                lat_a.append(time.perf_counter() - t0)
                methods.add(r.method)
                hits += len(set(r.values) & want)
            a50, a99 = pct(lat_a)
            recall = hits / (top_k * nq)
            print(f"    ours Find ({'/'.join(sorted(methods))}): p50 {a50:8.2f}  p99 {a99:8.2f}   "
                  f"recall@10 {recall:.4f}   exact/ANN p50 {e50 / a50:5.1f}x"
                  + (f"   baseline/ours p50 {b50 / a50:6.1f}x" if exact else ""))
            ann_store.close()
            del ann_store
        gc.collect()
    store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10k and 100k only, fewer queries")
    ap.add_argument("--full", action="store_true", help="also build and measure the ANN at 1M keys")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--set-n", type=int, default=100_000)
    args = ap.parse_args()
    print(f"local-store bench: dim {DIM}, cpus {os.cpu_count()}, numpy {np.__version__}"
          " (timings on a shared machine are noisy: rerun to confirm)")
    sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    queries = 50 if args.quick else args.queries
    bench_set(args.set_n if not args.quick else 20_000, 1000)
    ann = {100_000} | ({1_000_000} if args.full else set())
    bench_find("clustered", sizes, ann, queries, exact=True)
    bench_find("random", [100_000], {100_000}, queries, exact=False)


if __name__ == "__main__":
    main()
