"""Rerank: gRPC overhead on a 100-document rerank, and the dynamic batching gain under concurrency.

Part 1, latency: one ``Rerank`` of 100 documents (varied lengths) through a real
``inferd serve --backend rerankers`` subprocess, against the same model files run in this
process with no server: (a) the ONNX session as a user would call it (pairs in slices of
16 in input order, then sorted), (b) inferd's own engine in-process (same batcher, same
length ordering, no RPC). Rounds alternate between the three so machine noise hits all;
medians are printed with the ratio in-process/inferd (target >= 0.9x against (a)).

Part 2, batching: 16 callers in flight, each reranking 4 short documents, for a fixed
time, against two servers: one whose batches hold one request (``max_batch:4``), one
with the defaults (``max_batch:16``, so up to four callers share a forward). Pairs/s and
p50/p99 per call, ratio batched/per-request measured in the same run.

    python bench/rerank.py [--rounds 5] [--seconds 4] [--threads 0] [--skip-latency] [--skip-batching]

Numbers on a shared machine are noisy: compare ratios within one run and quote ``uptime``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from inferd.proto import backend_pb2 as pb  # noqa: E402
from tests.helpers import free_port, inferd_env, start_listening  # noqa: E402

QUERY = "How do vaccines train the immune system to fight a disease?"
TOPICS = ["vaccines", "the immune system", "antibodies", "viruses", "bacteria", "public health", "hospitals",
          "clinical trials", "nutrition", "sleep", "exercise", "the common cold", "allergies", "genetics",
          "epidemics", "medicine history", "surgery", "pharmacies", "nursing", "first aid"]


def documents(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    docs = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        sentences = int(rng.integers(1, 6))
        docs.append(" ".join(f"Passage {i}, part {k}: a remark about {topic} and how it affects people's "
                             f"daily lives in many countries." for k in range(sentences)))
    return docs


def start_server(options: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "inferd.cli", "serve", "--backend", "rerankers", "--host", "127.0.0.1",
           "--port", str(port), "--model-options", json.dumps({"Options": options, "Threads": threads})]
    return start_listening(cmd, inferd_env(INFERD_LOG_LEVEL="warning"), timeout=120), f"127.0.0.1:{port}"


def stub_for(channel: grpc.Channel):
    return channel.unary_unary("/backend.Backend/Rerank", pb.RerankRequest.SerializeToString,
                               pb.RerankResult.FromString)


def wait_ready(rerank) -> None:
    for _ in range(240):
        try:
            rerank(pb.RerankRequest(query="warm", documents=["up"]), timeout=30)
            return
        except grpc.RpcError:
            time.sleep(0.5)
    raise RuntimeError("server never answered Rerank")


# ---- part 1 --------------------------------------------------------------------------------
def bench_latency(rounds: int, threads: int) -> None:
    from inferd.engines.rerank import CrossEncoder, RerankEngine, rank_scores, resolve_cross_encoder

    docs = documents(100)
    files = resolve_cross_encoder()
    raw = CrossEncoder(files, threads=threads or None)
    engine = RerankEngine(CrossEncoder(files, threads=threads or None))
    proc, address = start_server([], threads)
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    rerank = stub_for(channel)
    request = pb.RerankRequest(query=QUERY, documents=docs)

    def session_in_process() -> list[int]:
        pairs = [(QUERY, d) for d in docs]
        logits = np.concatenate([raw.score(pairs[i:i + 16]).logits for i in range(0, len(pairs), 16)])
        return [r.index for r in rank_scores(logits, docs)]

    def engine_in_process() -> list[int]:
        return [r.index for r in engine.rerank_sync(QUERY, docs).results]

    def through_inferd() -> list[int]:
        return [r.index for r in rerank(request, timeout=120).results]

    runners = {"(a) ONNX session in-process": session_in_process, "(b) inferd engine in-process": engine_in_process,
               "inferd over gRPC": through_inferd}
    try:
        wait_ready(rerank)
        tops = {name: fn()[:5] for name, fn in runners.items()}  # warm-up, and the same answer from all
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, fn in runners.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        channel.close()
        proc.terminate()
        proc.wait()
        engine.close()
    print(f"\nRerank of 100 documents, median of {rounds} alternating rounds; {os.cpu_count()} CPUs, "
          f"threads {threads or 'default'}")
    for name, ts in times.items():
        print(f"  {name:<30} {statistics.median(ts) * 1000:8.1f} ms   (top 5: {tops[name]})")
    inferd = statistics.median(times["inferd over gRPC"])
    for name in list(runners)[:2]:
        print(f"  {name} / inferd: {statistics.median(times[name]) / inferd:.2f}x (target >= 0.9x)")


# ---- part 2 --------------------------------------------------------------------------------
async def drive(address: str, in_flight: int, seconds: float) -> tuple[float, float, float]:
    """(pairs/s, p50 ms, p99 ms) for 4-document Rerank calls with ``in_flight`` callers."""
    docs = documents(64)
    async with grpc.aio.insecure_channel(address) as channel:
        rerank = channel.unary_unary("/backend.Backend/Rerank", pb.RerankRequest.SerializeToString,
                                     pb.RerankResult.FromString)
        latencies: list[float] = []
        end = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < end:
                chosen = [docs[(i + j) % len(docs)][:160] for j in range(4)]
                t0 = time.perf_counter()
                await rerank(pb.RerankRequest(query=QUERY, documents=chosen), timeout=60)
                latencies.append(time.perf_counter() - t0)
                i += in_flight

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(in_flight)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000  # noqa: E731
    return 4 * len(latencies) / elapsed, q(0.50), q(0.99)


def bench_batching(rounds: int, seconds: float, threads: int) -> None:
    kinds = {"per-request": ["max_batch:4"], "batched": []}
    servers = {k: start_server(opts, threads) for k, opts in kinds.items()}
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
    try:
        for _, address in servers.values():
            with grpc.insecure_channel(address) as channel:
                wait_ready(stub_for(channel))
        for _ in range(rounds):
            for kind, (_, address) in servers.items():
                results[kind].append(asyncio.run(drive(address, 16, seconds)))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
    print(f"\n16 callers in flight, 4 documents each, median of {rounds} alternating rounds of {seconds:.0f}s")
    print(f"{'server':>12} | {'pairs/s':>8} | {'p50 ms':>8} | {'p99 ms':>8}")
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    for kind, (rate, p50, p99) in med.items():
        print(f"{kind:>12} | {rate:>8.1f} | {p50:>8.1f} | {p99:>8.1f}")
    per_round = [b[0] / u[0] for b, u in zip(results["batched"], results["per-request"], strict=True)]
    print(f"batched / per-request throughput: {med['batched'][0] / med['per-request'][0]:.2f}x "
          f"(per round: {', '.join(f'{r:.2f}x' for r in per_round)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores, up to 8)")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-batching", action="store_true")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    if not args.skip_latency:
        bench_latency(args.rounds, args.threads)
    if not args.skip_batching:
        bench_batching(args.rounds, args.seconds, args.threads)
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
