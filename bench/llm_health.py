"""Does generation stall the event loop? Health latency while chat+grammar streams run.

Issue 10, defect 3: chat templates, tokenization and grammar compilation ran on the event
loop, so one slow request stalled every stream and Health. This starts a real ``inferd
serve``, measures ``backend.Backend/Health`` latency on the idle server, then again while 4
clients loop over chat requests with a JSON-schema grammar (each one renders a template,
converts the schema and compiles a grammar), and prints p50/p99 of both.

    python bench/llm_health.py [--threads N] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_throughput import InferdServer  # noqa: E402

from inferd.client import new_client  # noqa: E402
from inferd.engines.llama import default_model_path  # noqa: E402
from inferd.engines.llama.config import default_threads  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402

# ~43 KB of JSON schema: converting it to GBNF and compiling the grammar is real work per request
SCHEMA = {"type": "object", "properties": {
    **{f"field_{i}": {"type": "string", "enum": [f"v{i}_{j}" for j in range(40)]} for i in range(100)},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "count": {"type": "integer"}}}}}}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def health_latencies(client, seconds: float) -> list[float]:
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await client.health_check(timeout=10)
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.005)
    return out


async def chat_loop(client, stop: asyncio.Event, counter: list[int]) -> None:
    req = pb.PredictOptions(UseTokenizerTemplate=True, Temperature=0, Tokens=24, Grammar=json.dumps(SCHEMA),
                            Messages=[pb.Message(role="user", content="Describe an inventory as JSON.")])
    while not stop.is_set():
        async for _ in client.predict_stream(req):
            pass
        counter[0] += 1


async def run(address: str, seconds: float) -> dict[str, list[float] | int]:
    client = new_client(address, parallel=True)
    idle = await health_latencies(client, seconds)
    stop = asyncio.Event()
    counter = [0]
    streams = [asyncio.create_task(chat_loop(client, stop, counter)) for _ in range(4)]
    await asyncio.sleep(1.0)  # let the streams get going
    busy = await health_latencies(client, seconds)
    stop.set()
    await asyncio.gather(*streams)
    await client.close()
    return {"idle": idle, "busy": busy, "requests": counter[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    threads = args.threads or default_threads()
    print(f"SmolLM2-135M, threads {threads}, 4 chat+grammar streams; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    server = InferdServer(default_model_path(), threads, 4, 1024, [])
    try:
        asyncio.run(server.wait_ready())
        res = asyncio.run(run(server.address, args.seconds))
    finally:
        server.close()
    idle, busy = res["idle"], res["busy"]
    assert isinstance(idle, list) and isinstance(busy, list)
    print("| Health | calls | p50 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, lat in (("idle server", idle), ("4 chat+grammar streams", busy)):
        print(f"| {name} | {len(lat)} | {1000 * statistics.median(lat):.2f} | {1000 * pct(lat, 0.99):.2f} | "
              f"{1000 * max(lat):.2f} |")
    print(f"p99 busy / idle: {pct(busy, 0.99) / pct(idle, 0.99):.1f}x; chat+grammar requests completed: "
          f"{res['requests']}; load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
