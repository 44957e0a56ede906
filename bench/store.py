"""local-store speed: Find over the wire against numpy's in-process scan, ANN, builds, Set.

Every figure is a ratio against a baseline measured in the same run (the machine is shared:
the load average is printed with each section):

* ``wire``: a real ``inferd serve --backend local-store`` subprocess holding 100k x 384
  keys, queried over gRPC with the plain generated stub (what a Go or Python client does),
  against numpy in the bench process doing the float32 scan on the same keys
  (``keys @ q`` + ``argpartition``, BLAS's default threads): Find p50 over the wire
  DURING the ANN index build (or its early probe) and AFTER it, for random and clustered
  data; the ANN's p50 and recall@10 on clustered data. Measurements alternate between
  ours and numpy in rounds, so load spikes hit both.
* ``inproc``: the engine in-process (no gRPC): exact Find (int8 scan + exact re-scoring,
  and the float32 BLAS scan) against the same numpy scan; the ANN on clustered data.
* ``set``: StoresSet throughput through the backend's protobuf conversion.

    python bench/store.py                # wire + inproc at 100k x 384 (several minutes on 2 cores)
    python bench/store.py --n 20000      # smaller and quicker
    python bench/store.py --sections set
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from plot import add_plot_argument, line_chart  # noqa: E402  (bench/plot.py)
from threadpoolctl import threadpool_limits  # noqa: E402

from inferd.backends.context import CallContext  # noqa: E402
from inferd.backends.local_store import LocalStoreBackend  # noqa: E402
from inferd.engines.store import StoreConfig, VectorStore  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402
from inferd.proto import backend_pb2_grpc as pb_grpc  # noqa: E402
from inferd.settings import Settings  # noqa: E402
from tests.helpers import free_port, inferd_env, start_listening  # noqa: E402

DIM = 384


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def make_data(kind: str, n: int, seed: int) -> np.ndarray:
    """``random``: unit Gaussian (the worst case for ANN); ``clustered``: 200 clusters in a
    64-d subspace of R^384 plus noise (embedding-like; not real embeddings)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        x = rng.standard_normal((n, DIM), dtype=np.float32)
    else:
        basis = np.random.default_rng(1).standard_normal((64, DIM)).astype(np.float32)
        centres = np.random.default_rng(2).standard_normal((200, 64)).astype(np.float32)
        lab = rng.integers(0, 200, n)
        x = (centres[lab] + 0.6 * rng.standard_normal((n, 64), dtype=np.float32)) @ basis
        noise = rng.standard_normal((n, DIM), dtype=np.float32)
        x += 0.3 * noise * (np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def p50(lat: list[float]) -> float:
    return float(np.percentile(np.array(lat) * 1e3, 50))


def numpy_scan(keys: np.ndarray, q: np.ndarray, k: int = 10) -> np.ndarray:
    sims = keys @ q
    return np.argpartition(sims, len(sims) - k)[len(sims) - k :]


class Server:
    """A local-store server subprocess and a plain gRPC stub to it."""

    def __init__(self, options: list[str]) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "inferd.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--backend", "local-store", "--model", "store://bench",
               "--model-options", json.dumps({"Options": options})]
        self.proc = start_listening(cmd, inferd_env())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", 100 << 20), ("grpc.max_receive_message_length", 100 << 20)])
        self.stub = pb_grpc.BackendStub(self.channel)
        for _ in range(200):
            try:
                if self.stub.Status(pb.HealthMessage()).state == pb.StatusResponse.State.READY:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.05)

    def set(self, data: np.ndarray, batch: int = 2000) -> None:
        for s in range(0, len(data), batch):
            rows = data[s : s + batch]
            self.stub.StoresSet(pb.StoresSetOptions(
                Keys=[pb.StoresKey(Floats=r) for r in rows.tolist()],
                Values=[pb.StoresValue(Bytes=b"%d" % (s + i)) for i in range(len(rows))]))

    def breakdown(self) -> dict[str, int]:
        return dict(self.stub.Status(pb.HealthMessage()).memory.breakdown)

    def find(self, blob: bytes) -> pb.StoresFindResult:
        return self.stub.StoresFind(pb.StoresFindOptions.FromString(blob))

    def close(self) -> None:
        self.channel.close()
        self.proc.kill()
        self.proc.wait(10)


def alternate(ours, theirs, queries: list, rounds: int = 4) -> tuple[list[float], list[float]]:
    """Time ``ours(q)`` and ``theirs(q)`` over ``queries`` in alternating rounds."""
    a: list[float] = []
    b: list[float] = []
    per = max(1, len(queries) // rounds)
    for r in range(rounds):
        part = queries[r * per : (r + 1) * per]
        for fn, out in ((ours, a), (theirs, b)):
            for q in part:
                t0 = time.perf_counter()
                fn(q)
                out.append(time.perf_counter() - t0)
    return a, b


def bench_wire(kind: str, n: int, nq: int, max_wait: float) -> None:
    print(f"\n## Find over the wire, {kind} data, {n:,} x {DIM}, top-10 ({load()})")
    data = make_data(kind, n, 1000)
    qs = make_data(kind, nq, 999)
    blobs = [pb.StoresFindOptions(Key=pb.StoresKey(Floats=q.tolist()), TopK=10).SerializeToString() for q in qs]
    truth = [set(numpy_scan(data, q).tolist()) for q in qs]
    server = Server([f"ann_threshold:{n // 2}"])
    try:
        t0 = time.perf_counter()
        server.set(data)
        print(f"  loaded in {time.perf_counter() - t0:.1f}s over gRPC; ANN build started at {n // 2:,} entries")

        def ours(i: int) -> None:
            server.find(blobs[i])

        def numpy_default(i: int) -> None:
            numpy_scan(data, qs[i])

        during: list[float] = []
        base_during: list[float] = []
        i = 0
        while server.breakdown().get("store_ann_building") and i < 3 * nq:
            a, b = alternate(ours, numpy_default, [i % nq], rounds=1)
            during += a
            base_during += b
            i += 1
        t_build = time.perf_counter() - t0
        if during:
            print(f"  during the index build/probe ({len(during)} queries): ours {p50(during):6.2f} ms p50, "
                  f"numpy in-process {p50(base_during):6.2f} ms -> ours/numpy {p50(during) / p50(base_during):4.2f}x")
        waited = time.perf_counter()
        while server.breakdown().get("store_ann_building") and time.perf_counter() - waited < max_wait:
            time.sleep(0.5)
        bd = server.breakdown()
        if bd.get("store_ann_building"):
            print(f"  (the builder was still running after waiting {max_wait:.0f}s more: a busy machine "
                  f"starves a nice-19 thread; the figures below are still 'during')")
        print(f"  builder done {time.perf_counter() - t0:.0f}s after loading began (measured for {t_build:.0f}s); "
              f"ANN ef in use: {bd.get('store_ann_ef', 0) or 'none (exact scan kept)'}")
        hits = 0
        for j in range(nq):
            r = server.find(blobs[j])
            hits += len({int(v.Bytes) for v in r.Values} & truth[j])
        a, b = alternate(ours, numpy_default, list(range(nq)))
        with threadpool_limits(1, "blas"):
            _, b1 = alternate(ours, numpy_default, list(range(nq)))
        health, _ = alternate(lambda i: server.stub.Health(pb.HealthMessage()), lambda i: None, list(range(nq)))
        method = "ANN" if bd.get("store_ann_ef") else "exact"
        print(f"  after: ours ({method}) {p50(a):6.2f} ms p50, recall@10 {hits / (10 * nq):.4f}; numpy in-process "
              f"{p50(b):6.2f} ms (1 BLAS thread: {p50(b1):.2f}) -> ours/numpy {p50(a) / p50(b):4.2f}x; "
              f"gRPC floor (Health) {p50(health):.2f} ms")
    finally:
        server.close()
    if kind == "clustered":  # the exact path over the wire on the same data
        server = Server(["ann:off"])
        try:
            server.set(data)
            a, b = alternate(lambda i: server.find(blobs[i]), lambda i: numpy_scan(data, qs[i]), list(range(nq)))
            print(f"  exact (ann:off): ours {p50(a):6.2f} ms p50, numpy in-process {p50(b):6.2f} ms -> "
                  f"ours/numpy {p50(a) / p50(b):4.2f}x")
        finally:
            server.close()


def bench_inproc(n: int, nq: int) -> None:
    print(f"\n## Exact Find in-process (no gRPC), random data, {n:,} x {DIM}, top-10 ({load()})")
    data = make_data("random", n, 1000)
    qs = make_data("random", nq, 999)
    for scan in ("int8", "float32"):
        store = VectorStore(None, StoreConfig(ann="off", scan=scan))
        for s in range(0, n, 10_000):
            store.set(data[s : s + 10_000], [b"%d" % (s + i) for i in range(len(data[s : s + 10_000]))])
        a, b = alternate(lambda q, st=store: st.find(q, 10), lambda q: numpy_scan(data, q), list(qs))
        print(f"  ours ({store.scan_kind} scan + exact re-scoring) {p50(a):6.2f} ms p50; numpy float32 scan "
              f"{p50(b):6.2f} ms -> ours/numpy {p50(a) / p50(b):4.2f}x   (scan data {store.stats()['scan_bytes'] >> 20} MiB)")
        store.close()


def bench_inproc_ann(n: int, nq: int) -> None:
    print(f"\n## ANN Find in-process (no gRPC), clustered data, {n:,} x {DIM}, top-10 ({load()})")
    data = make_data("clustered", n, 1000)
    qs = make_data("clustered", nq, 999)
    store = VectorStore(None, StoreConfig(ann_threshold=n, ann_background=False, ann_build_threads=2,
                                          ann_build_nice=0))
    t0 = time.perf_counter()
    for s in range(0, n, 10_000):
        store.set(data[s : s + 10_000], [b"%d" % (s + i) for i in range(len(data[s : s + 10_000]))])
    print(f"  loaded and indexed (2 threads, normal priority) in {time.perf_counter() - t0:.0f}s: {store.stats()['ann']}")
    hits = sum(len(set(store.find(q, 10).values) & set(store.exact_find(q, 10).values)) for q in qs)
    a, b = alternate(lambda q: store.find(q, 10), lambda q: numpy_scan(data, q), list(qs))
    e, _ = alternate(lambda q: store.exact_find(q, 10), lambda q: None, list(qs))
    print(f"  ours (ANN) {p50(a):6.3f} ms p50, recall@10 {hits / (10 * nq):.4f}; ours exact {p50(e):6.2f} ms; "
          f"numpy float32 scan {p50(b):6.2f} ms -> ANN/numpy {p50(a) / p50(b):5.3f}x")
    store.close()


def bench_sizes(sizes: list[int], nq: int) -> dict[str, list[tuple[float, float]]]:
    """Exact Find p50 by store size, in-process (ours vs numpy), for the chart of ``--plot``."""
    print(f"\n## Exact Find by store size, in-process, random data, {DIM} dims, top-10 ({load()})")
    ours_name, numpy_name = "inferd exact Find (int8 scan + exact re-scoring)", "numpy float32 scan"
    out: dict[str, list[tuple[float, float]]] = {ours_name: [], numpy_name: []}
    qs = list(make_data("random", nq, 999))
    for n in sizes:
        data = make_data("random", n, 1000)
        store = VectorStore(None, StoreConfig(ann="off", scan="int8"))
        for s in range(0, n, 10_000):
            store.set(data[s : s + 10_000], [b"%d" % (s + i) for i in range(len(data[s : s + 10_000]))])
        a, b = alternate(lambda q, st=store: st.find(q, 10), lambda q, d=data: numpy_scan(d, q), qs)
        print(f"  {n:>9,} keys: ours {p50(a):7.3f} ms p50, numpy {p50(b):7.3f} ms -> ours/numpy {p50(a) / p50(b):4.2f}x")
        out[ours_name].append((n, p50(a)))
        out[numpy_name].append((n, p50(b)))
        store.close()
    return out


def bench_set(n: int, batch: int = 1000) -> None:
    print(f"\n## Set: {n:,} x {DIM} keys in StoresSet messages of {batch} ({load()})")
    data = make_data("random", n, 11)
    blobs = []
    for s in range(0, n, batch):
        rows = data[s : s + batch].tolist()
        blobs.append(pb.StoresSetOptions(
            Keys=[pb.StoresKey(Floats=r) for r in rows],
            Values=[pb.StoresValue(Bytes=b"v%d" % (s + i)) for i in range(len(rows))],
        ).SerializeToString())
    ctx = CallContext("StoresSet")

    def ours(durable: bool) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings.load([], env={}).with_overrides(store_path=tmp if durable else "")
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
        np.concatenate(chunks)
        return time.perf_counter() - t0

    base, mem, dur = baseline(), ours(False), ours(True)
    print(f"  baseline (parse, protobuf -> numpy, append): {n / base:9.0f} keys/s")
    print(f"  ours, memory : {n / mem:9.0f} keys/s (baseline/ours time {base / mem:.2f})")
    print(f"  ours, durable: {n / dur:9.0f} keys/s (baseline/ours time {base / dur:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--data", default="random,clustered", help="data sets for the wire section")
    ap.add_argument("--max-wait", type=float, default=300.0, help="longest wait for an index build, seconds")
    ap.add_argument("--sections", default="wire,inproc", help="comma-separated: wire, inproc, set, sizes")
    ap.add_argument("--sizes", default="1000,10000,100000", help="store sizes of the sizes section (and --plot)")
    add_plot_argument(ap)
    args = ap.parse_args()
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"], capture_output=True, text=True)
    print(f"local-store bench: dim {DIM}, cpus {os.cpu_count()}, {cpu.stdout.strip()}, numpy {np.__version__}; "
          f"{load()} (a shared machine: compare the ratios, not the absolute figures)")
    sections = args.sections.split(",")
    if "wire" in sections:
        for kind in args.data.split(","):
            bench_wire(kind, args.n, args.queries, args.max_wait)
    if "inproc" in sections:
        bench_inproc(args.n, args.queries)
        bench_inproc_ann(args.n, args.queries)
    if "set" in sections:
        bench_set(min(args.n, 20_000))
    if "sizes" in sections or args.plot:
        by_size = bench_sizes([int(n) for n in args.sizes.split(",")], args.queries)
        if args.plot:
            line_chart(args.plot, "Find latency by store size (exact, top-10, in-process)", "keys in the store",
                       "p50 ms per query", by_size, logx=True, logy=True,
                       note=f"{DIM} dims, random data, {args.queries} queries, p50")


if __name__ == "__main__":
    main()
