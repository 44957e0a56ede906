"""RPC overhead of inferd versus a bare grpc.aio server answering the same rpc.

Both servers run as subprocesses with the same gRPC options; this process drives
unary ``backend.Backend/Health`` calls with 1 and 16 calls in flight for a fixed time
and reports calls/s and p50/p99 latency. Rounds alternate (bare, inferd, bare, ...)
so machine noise hits both; the median round is reported with the ratio
inferd/bare (target >= 0.9x throughput).

    python bench/rpc_overhead.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from inferd.proto import backend_pb2 as pb  # noqa: E402
from tests.helpers import free_port, inferd_env, start_listening  # noqa: E402

BARE_SERVER = textwrap.dedent(
    """
    import asyncio, sys, grpc
    from inferd.proto import backend_pb2 as pb
    OK = pb.Reply(message=b"OK")
    async def health(request, context):
        return OK
    async def main(port):
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 100 << 20), ("grpc.max_send_message_length", 100 << 20)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("backend.Backend", {
            "Health": grpc.unary_unary_rpc_method_handler(health, pb.HealthMessage.FromString, pb.Reply.SerializeToString)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("listening on", port, flush=True)
        await server.wait_for_termination()
    asyncio.run(main(int(sys.argv[1])))
    """
)


def start(kind: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "bare":
        cmd = [sys.executable, "-c", BARE_SERVER, str(port)]
    else:
        cmd = [sys.executable, "-m", "inferd.cli", "serve", "--backend", "tests.fixtures_backend:EchoBackend",
               "--model", "test-model", "--host", "127.0.0.1", "--port", str(port)]
    return start_listening(cmd, inferd_env(INFERD_LOG_LEVEL="warning")), f"127.0.0.1:{port}"


async def drive(address: str, in_flight: int, seconds: float) -> tuple[float, float, float]:
    """Return (calls/s, p50 ms, p99 ms)."""
    async with grpc.aio.insecure_channel(address) as channel:
        health = channel.unary_unary("/backend.Backend/Health", pb.HealthMessage.SerializeToString, pb.Reply.FromString)
        for _ in range(200):  # warm-up
            await health(pb.HealthMessage())
        latencies: list[float] = []
        end = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                await health(pb.HealthMessage())
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000  # noqa: E731
    return len(latencies) / elapsed, q(0.50), q(0.99)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    servers = {kind: start(kind) for kind in ("bare", "inferd")}
    try:
        results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        for _ in range(args.rounds):
            for in_flight in (1, 16):
                for kind in ("bare", "inferd"):
                    r = asyncio.run(drive(servers[kind][1], in_flight, args.seconds))
                    results.setdefault((kind, in_flight), []).append(r)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()

    def median(kind: str, n: int) -> tuple[float, float, float]:
        rows = sorted(results[(kind, n)])
        return rows[len(rows) // 2]

    print(f"Health rpc, {args.rounds} alternating rounds of {args.seconds:.0f}s, median round; {os.cpu_count()} CPUs")
    print(f"{'in flight':>9} | {'server':>6} | {'calls/s':>8} | {'p50 ms':>7} | {'p99 ms':>7}")
    for n in (1, 16):
        for kind in ("bare", "inferd"):
            rps, p50, p99 = median(kind, n)
            print(f"{n:>9} | {kind:>6} | {rps:>8.0f} | {p50:>7.3f} | {p99:>7.3f}")
        ratio = median("inferd", n)[0] / median("bare", n)[0]
        spread = statistics.pstdev([r[0] for r in results[("inferd", n)]]) / median("inferd", n)[0]
        print(f"{n:>9} | ratio inferd/bare throughput: {ratio:.2f}x (target >= 0.90x; inferd round spread {spread:.0%})")


if __name__ == "__main__":
    main()
