"""Load and soak: 16/64/256 concurrent clients mixing Predict, PredictStream, Embedding, Stores*.

Starts one llama-cpp (packaged SmolLM2, Threads 1, 4 slots), one sentence-embeddings and one
local-store server, warms them up, then runs each level of concurrency for a fixed time and
prints two tables: per rpc (calls, OK, refusals, transport errors, p50/p99) and per server
(RSS after warm-up and at the end, threads and fds idle before and after). The machine's load
average is printed beside the figures: they come from a shared machine. The load generator
and its checks are tests/reliability/loadgen.py.

    python bench/soak.py [--seconds 20] [--levels 16 64 256] [--durable]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.reliability.loadgen import OPS_HEADER, SERVERS_HEADER, run_level  # noqa: E402
from tests.reliability.servers import serving  # noqa: E402


async def soak(levels: list[int], seconds: float, warmup: float, store_path: str | None) -> int:
    store_args = ("--store-path", store_path) if store_path else ()
    with contextlib.ExitStack() as stack:
        servers = {
            "llama-cpp": stack.enter_context(serving("llama-cpp")),
            "sentence-embeddings": stack.enter_context(serving("sentence-embeddings")),
            "local-store": stack.enter_context(serving("local-store", *store_args)),
        }
        # Warm up at the highest level: bounded pools (the runtime's worker threads, grpc's
        # event engine) grow to what that load needs; growth past that afterwards is a leak.
        print(f"warm-up: {max(levels)} clients for {warmup:.0f}s", flush=True)
        await run_level(servers, max(levels), warmup)
        results = []
        for clients in levels:
            load_before = os.getloadavg()[0]
            started = time.monotonic()
            result = await run_level(servers, clients, seconds)
            results.append(result)
            print(f"{clients} clients: {time.monotonic() - started:.0f}s, transport errors "
                  f"{result.transport_errors}, load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}",
                  flush=True)
            for line in result.errors[:10]:
                print("   ", line)
        print()
        print(OPS_HEADER)
        for r in results:
            print("\n".join(r.rows()))
        print()
        print(SERVERS_HEADER)
        for r in results:
            print("\n".join(r.server_rows()))
        failures = []
        for r in results:
            if r.transport_errors:
                failures.append(f"{r.clients} clients: {r.transport_errors} transport errors")
            for name, f in r.servers.items():
                if f.rss_growth >= 0.05:
                    failures.append(f"{r.clients} clients: {name} RSS grew {f.rss_growth:.1%} after warm-up")
                after = f.idle_after or f.idle_before
                if after.threads > f.idle_before.threads or after.fds > f.idle_before.fds:
                    failures.append(f"{r.clients} clients: {name} threads/fds not back to baseline "
                                    f"({f.idle_before.threads}/{f.idle_before.fds} -> {after.threads}/{after.fds}; "
                                    f"more threads named {f.idle_before.thread_diff(after)})")
        print()
        print("cores:", os.cpu_count(), "| load average now:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
        print("RESULT:", "PASS" if not failures else "FAIL\n  " + "\n  ".join(failures))
        return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each level")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up before the first level")
    parser.add_argument("--levels", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--durable", action="store_true", help="local-store with --store-path (fsynced log)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(soak(args.levels, args.seconds, args.warmup, tmp if args.durable else None))


if __name__ == "__main__":
    raise SystemExit(main())
