"""Ray Serve scale-out: 1 vs 2 replicas, and what Ray's gRPC proxy costs per call.

One run, same model (SmolLM2, the packaged default), threads per engine and greedy settings:

* direct: a real ``inferd serve`` subprocess (the baseline, no Ray);
* ray-1 / ray-2: ``inferd.scale.deploy`` on a single-node Ray, two applications of the same model
  (1 replica and 2 replicas), reached through Ray Serve's gRPC proxy (``application`` metadata).

All three run at once and are measured in alternation, round after round, so they share the
machine's load (the figures are medians over the rounds).

Printed: Health p50/p99 (ms) direct vs through the proxy; PredictStream tokens/s at 1 stream
direct vs proxy; aggregate tokens/s at ``--streams`` concurrent streams for direct, ray-1 and
ray-2. Every ratio is against a baseline measured in this run. With Threads 1 per engine,
2 replicas use 2 cores where 1 replica uses one: on a 2-core machine that is the whole
machine, so expect at most ~2x and less when the machine is shared (load average printed).

    python bench/ray_scale.py [--threads 1] [--tokens 64] [--streams 8] [--health-calls 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from inferd.client import ChannelOptions, new_client  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402
from inferd.supervisor.config import config_from_dict  # noqa: E402

_IDS = itertools.count()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(tokens: int) -> pb.PredictOptions:
    # A fresh number per request: no prefix-cache reuse between requests.
    return pb.PredictOptions(Prompt=f"Request {next(_IDS)}. Tell me a long story about a dragon.",
                             Tokens=tokens, IgnoreEOS=True, Temperature=0.0, TopK=1)


def _client(target: tuple[str, str]):
    address, app = target
    return new_client(address, parallel=True, options=ChannelOptions(metadata=(("application", app),) if app else ()))


async def health_samples(target: tuple[str, str], calls: int) -> list[float]:
    client = _client(target)
    try:
        for _ in range(10):
            await client.call("Health")
        samples = []
        for _ in range(calls):
            t = time.perf_counter()
            await client.call("Health")
            samples.append((time.perf_counter() - t) * 1000)
    finally:
        await client.close()
    return samples


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


async def stream_tokens_per_s(target: tuple[str, str], streams: int, tokens: int) -> float:
    """Aggregate generated tokens/s of ``streams`` concurrent PredictStreams."""
    client = _client(target)
    try:
        async for _ in client.call_stream("PredictStream", _request(4)):  # warm-up
            pass

        async def one() -> int:
            last = 0
            async for reply in client.call_stream("PredictStream", _request(tokens), timeout=600):
                last = reply.tokens
            return last

        t = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(streams)))
        return sum(counts) / (time.perf_counter() - t)
    finally:
        await client.close()


def start_direct(threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "INFERD_WATCH_PARENT": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", "serve", "--backend", "llama-cpp", "--host",
                             "127.0.0.1", "--port", str(port), "--model-options", json.dumps({"Threads": threads})],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    while "listening on" not in proc.stdout.readline():
        if proc.poll() is not None:
            raise SystemExit("inferd serve did not start")
    return proc, f"127.0.0.1:{port}"


async def wait_ready(target: tuple[str, str]) -> None:
    client = _client(target)
    try:
        for _ in range(600):
            try:
                if (await client.call("Status", timeout=5)).state == pb.StatusResponse.READY:
                    return
            except Exception:  # noqa: BLE001 - still starting
                pass
            await asyncio.sleep(0.1)
    finally:
        await client.close()
    raise SystemExit(f"{target} never became READY")


def ray_config(threads: int):
    return config_from_dict({"models": [
        {"name": f"r{n}", "backend": "llama-cpp", "options": {"Threads": threads},
         "ray": {"num_replicas": n, "num_cpus": 1}} for n in (1, 2)]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per engine [1]")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--health-calls", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3, help="median of this many runs per tokens/s figure [3]")
    args = ap.parse_args()
    print(f"cores: {os.cpu_count()}  load average at start: {os.getloadavg()[0]:.1f}  threads/engine: {args.threads}")

    from inferd.scale.app import deploy, import_ray

    ray, serve = import_ray()
    proc, direct_address = start_direct(args.threads)
    session = tempfile.mkdtemp(prefix="irb", dir="/tmp")
    port = _free_port()
    targets = {"direct": (direct_address, ""), "ray-1": (f"127.0.0.1:{port}", "r1"),
               "ray-2": (f"127.0.0.1:{port}", "r2")}
    health: dict[str, list[float]] = {"direct": [], "ray-1": []}
    tps1: dict[str, list[float]] = {"direct": [], "ray-1": []}
    tpsn: dict[str, list[float]] = {name: [] for name in targets}
    try:
        deploy(ray_config(args.threads), grpc_port=port, http_port=_free_port(), num_cpus=4, temp_dir=session)
        for target in targets.values():
            asyncio.run(wait_ready(target))
        for _ in range(args.repeat):  # alternate, so every row sees the same load
            for name in health:
                health[name] += asyncio.run(health_samples(targets[name], args.health_calls // args.repeat))
            for name in tps1:
                tps1[name].append(asyncio.run(stream_tokens_per_s(targets[name], 1, args.tokens)))
            for name in tpsn:
                tpsn[name].append(asyncio.run(stream_tokens_per_s(targets[name], args.streams, args.tokens)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(session, ignore_errors=True)
    rows: dict[str, dict[str, float]] = {name: {"tpsN": statistics.median(v)} for name, v in tpsn.items()}
    for name in health:
        rows[name]["p50"], rows[name]["p99"] = percentiles(health[name])
        rows[name]["tps1"] = statistics.median(tps1[name])

    d, r1, r2 = rows["direct"], rows["ray-1"], rows["ray-2"]
    print(f"\nHealth latency ms      p50      p99   ({args.health_calls} sequential calls)")
    print(f"  direct            {d['p50']:7.2f}  {d['p99']:7.2f}")
    print(f"  ray proxy         {r1['p50']:7.2f}  {r1['p99']:7.2f}   (+{r1['p50'] - d['p50']:.2f} ms p50)")
    print(f"\nPredictStream tok/s, 1 stream, {args.tokens} tokens")
    print(f"  direct            {d['tps1']:7.1f}")
    print(f"  ray proxy         {r1['tps1']:7.1f}   ({r1['tps1'] / d['tps1']:.2f}x direct)")
    print(f"\nAggregate tok/s, {args.streams} concurrent streams")
    print(f"  direct            {d['tpsN']:7.1f}")
    print(f"  ray, 1 replica    {r1['tpsN']:7.1f}   ({r1['tpsN'] / d['tpsN']:.2f}x direct)")
    print(f"  ray, 2 replicas   {r2['tpsN']:7.1f}   ({r2['tpsN'] / r1['tpsN']:.2f}x 1 replica)")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
