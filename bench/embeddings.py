"""Embeddings: engine choice (ONNX vs torch) and dynamic batching through the real gRPC server.

Part 1, engines (in this process, no server): the packaged all-MiniLM-L6-v2 run by
the ONNX engine and by sentence-transformers on torch (skipped if torch is absent):
minimum cosine between their vectors on a sentence set, and sentences/s at batch
sizes 1, 8 and 32, rounds alternating between engines so machine noise hits both.

Part 2, batching (two ``inferd serve --backend sentence-embeddings`` subprocesses):
one with batching off (``max_batch:1``), one with the defaults. This process sends
single-sentence ``Embedding`` calls with 1 and 16 in flight for a fixed time, rounds
alternating between servers, and prints calls/s, p50/p99 latency and the ratio of
batched 16-in-flight throughput to the unbatched rate measured in the same run
(target >= 3x).

    python bench/embeddings.py [--seconds 4] [--rounds 3] [--threads N] [--skip-engines] [--skip-server]

Numbers on a shared machine are noisy: compare ratios within one run, re-run to confirm.
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inferd.proto import backend_pb2 as pb  # noqa: E402
from tests.helpers import free_port, inferd_env, start_listening  # noqa: E402

TOPICS = ["cats", "the stock market", "jazz guitar", "black holes", "Italian cooking", "football",
          "the weather in spring", "high-speed trains", "databases", "gardening", "chess openings",
          "volcanoes", "photography", "marathon training", "ancient Rome", "coffee"]
SENTENCES = [f"Sentence {i} is a short remark about {t} and why people care about it." for i, t in
             enumerate(TOPICS * 4)]


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---- part 1: engines ---------------------------------------------------------------------
def bench_engines(seconds: float, rounds: int, threads: int) -> None:
    from inferd.engines.embeddings import OnnxEncoder, read_spec, resolve_model_dir

    spec = read_spec(resolve_model_dir())
    engines = {"onnx": OnnxEncoder(spec, threads)}
    try:
        from inferd.engines.embeddings import TorchEncoder

        engines["torch"] = TorchEncoder(spec, threads)
    except ImportError as exc:
        print(f"torch engine not available ({exc}); measuring ONNX only")
    if "torch" in engines:
        a = engines["onnx"].encode(SENTENCES).vectors
        b = engines["torch"].encode(SENTENCES).vectors
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(f"cosine onnx vs torch over {len(SENTENCES)} sentences: min {cos.min():.7f}, "
              f"max |diff| {np.abs(a - b).max():.2e}")
    sizes = (1, 8, 32)
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for bs in sizes:
            batch = SENTENCES[:bs]
            for name, enc in engines.items():
                enc.encode(batch)  # warm-up for this shape
                n = 0
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    enc.encode(batch)
                    n += bs
                rates.setdefault((name, bs), []).append(n / (time.perf_counter() - t0))
    print(f"\nengines, sentences/s, median of {rounds} alternating rounds of {seconds:.0f}s; {os.cpu_count()} CPUs, "
          f"engine threads {threads or 'default'}")
    print(f"{'batch':>5} | " + " | ".join(f"{n:>8}" for n in engines) + (" | onnx/torch" if "torch" in engines else ""))
    for bs in sizes:
        row = [median(rates[(n, bs)]) for n in engines]
        ratio = f" | {row[0] / row[1]:.2f}x" if "torch" in engines else ""
        print(f"{bs:>5} | " + " | ".join(f"{r:>8.1f}" for r in row) + ratio)


# ---- part 2: batching through the server --------------------------------------------------
def start_server(options: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "inferd.cli", "serve", "--backend", "sentence-embeddings",
           "--host", "127.0.0.1", "--port", str(port), "--model-options", json.dumps({"Options": options, "Threads": threads})]
    return start_listening(cmd, inferd_env(INFERD_LOG_LEVEL="warning")), f"127.0.0.1:{port}"


async def drive(address: str, in_flight: int, seconds: float) -> tuple[float, float, float]:
    """Return (calls/s, p50 ms, p99 ms) for single-sentence Embedding calls."""
    async with grpc.aio.insecure_channel(address) as channel:
        embed = channel.unary_unary("/backend.Backend/Embedding", pb.PredictOptions.SerializeToString,
                                    pb.EmbeddingResult.FromString)
        for _ in range(10):  # wait until the model is loaded and warm
            try:
                await embed(pb.PredictOptions(Embeddings="warm up"))
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.5)
        await asyncio.gather(*(embed(pb.PredictOptions(Embeddings=s)) for s in SENTENCES[:in_flight]))
        latencies: list[float] = []
        end = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                await embed(pb.PredictOptions(Embeddings=SENTENCES[i % len(SENTENCES)]))
                latencies.append(time.perf_counter() - t0)
                i += in_flight

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(in_flight)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000  # noqa: E731
    return len(latencies) / elapsed, q(0.50), q(0.99)


def bench_server(seconds: float, rounds: int, threads: int) -> None:
    kinds = {"unbatched": ["max_batch:1"], "batched": []}
    servers = {k: start_server(opts, threads) for k, opts in kinds.items()}
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    try:
        for _ in range(rounds):
            for n in (1, 16):
                for kind in kinds:
                    results.setdefault((kind, n), []).append(asyncio.run(drive(servers[kind][1], n, seconds)))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()

    def med(kind: str, n: int) -> tuple[float, float, float]:
        rows = sorted(results[(kind, n)])
        return rows[len(rows) // 2]

    print(f"\nEmbedding rpc through the gRPC server, single sentences, median of {rounds} alternating "
          f"rounds of {seconds:.0f}s; {os.cpu_count()} CPUs, engine threads {threads or 'default'}")
    print(f"{'in flight':>9} | {'server':>9} | {'calls/s':>8} | {'p50 ms':>7} | {'p99 ms':>7}")
    for n in (1, 16):
        for kind in kinds:
            rps, p50, p99 = med(kind, n)
            print(f"{n:>9} | {kind:>9} | {rps:>8.1f} | {p50:>7.2f} | {p99:>7.2f}")
    base = med("unbatched", 16)[0]
    base1 = med("unbatched", 1)[0]
    batched = med("batched", 16)[0]
    rounds_ratio = [b[0] / u[0] for b, u in zip(results[("batched", 16)], results[("unbatched", 16)], strict=True)]
    print(f"batched/unbatched throughput at 16 in flight: {batched / base:.2f}x "
          f"(per round: {', '.join(f'{r:.2f}x' for r in rounds_ratio)}; target >= 3x)")
    print(f"batched at 16 in flight / unbatched single caller: {batched / base1:.2f}x")
    print(f"single caller, batched/unbatched latency p50: {med('batched', 1)[1] / med('unbatched', 1)[1]:.2f}x "
          "(the adaptive window should keep this near 1x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="engine threads for part 1 (0: each engine's default, all cores)")
    ap.add_argument("--server-threads", type=int, default=0,
                    help="ModelOptions.Threads for the servers in part 2 (0: the backend's default)")
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--skip-server", action="store_true")
    args = ap.parse_args()
    if not args.skip_engines:
        bench_engines(args.seconds, args.rounds, args.threads)
    if not args.skip_server:
        bench_server(args.seconds, args.rounds, args.server_threads)


if __name__ == "__main__":
    main()
