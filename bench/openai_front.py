"""The OpenAI HTTP front against the gRPC backend directly: stream tokens/s, TTFT, 64 clients.

    python bench/openai_front.py [--tokens 128] [--rounds 4] [--clients 64] [--client-tokens 32]

Starts ``inferd up models.yaml --http 127.0.0.1:0`` (SmolLM2 on llama-cpp, Threads 2,
4 slots) as a child process, then, from this process:

1. single stream, alternating rounds: ``POST /v1/chat/completions`` with ``stream: true``
   (httpx, SSE) versus ``PredictStream`` with the same options straight to the backend
   over gRPC (inferd's async client); greedy, ``ignore_eos``, N tokens. Prints tokens/s
   and time to first token for both and the ratio HTTP/gRPC (target >= 0.95x);
2. ``--clients`` concurrent streaming HTTP clients: errors (target 0), aggregate tokens/s,
   p50/p99 TTFT.

The figures depend on the machine's load: run ``uptime`` beside it; only same-run ratios count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from inferd.client import new_client  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402

MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def start_front(tmp: Path) -> tuple[subprocess.Popen[str], str, str]:
    (tmp / "models.yaml").write_text(
        "http: 127.0.0.1:0\n"
        "models:\n"
        "  - name: smol\n"
        "    backend: llama-cpp\n"
        "    parallel: true\n"
        "    options: {ContextSize: 8192, Threads: 2, Options: ['parallel:4']}\n")
    proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", "up", str(tmp / "models.yaml"),
                             "--run-dir", str(tmp / "run")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    http = backend = ""
    assert proc.stdout is not None
    while not (http and backend):
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"inferd up exited ({proc.wait()})")
        if line.startswith("inferd: http on "):
            http = line.split()[-1]
        if " ready at " in line:
            backend = line.split()[-1]
    return proc, http, backend


async def http_stream(h: httpx.AsyncClient, url: str, tokens: int) -> tuple[float, float, int]:
    body = {"model": "smol", "messages": MESSAGES, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = 0.0
    n = 0
    async with h.stream("POST", f"http://{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"]["message"])
            if data["choices"] and data["choices"][0]["delta"].get("content") and not ttft:
                ttft = time.perf_counter() - t0
            if data.get("usage"):
                n = data["usage"]["completion_tokens"]
    return time.perf_counter() - t0, ttft, n


async def grpc_stream(client: object, tokens: int) -> tuple[float, float, int]:
    request = pb.PredictOptions(Messages=[pb.Message(role="user", content=MESSAGES[0]["content"])],
                                UseTokenizerTemplate=True, Tokens=tokens, Temperature=0, TopP=1.0, IgnoreEOS=True)
    t0 = time.perf_counter()
    ttft = 0.0
    n = 0
    async for reply in client.predict_stream(request):  # type: ignore[attr-defined]
        if not ttft and any(d.content for d in reply.chat_deltas):
            ttft = time.perf_counter() - t0
        n = reply.tokens
    return time.perf_counter() - t0, ttft, n


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, http_url, backend = start_front(Path(tmp))
        try:
            client = new_client(backend, parallel=True)
            async with httpx.AsyncClient(timeout=args.timeout, limits=httpx.Limits(max_connections=256)) as h:
                await http_stream(h, http_url, 16)  # warm-up both paths
                await grpc_stream(client, 16)
                rows: dict[str, list[tuple[float, float, int]]] = {"http": [], "grpc": []}
                for i in range(args.rounds):
                    order = ("http", "grpc") if i % 2 == 0 else ("grpc", "http")
                    for path in order:
                        rows[path].append(await (http_stream(h, http_url, args.tokens) if path == "http"
                                                 else grpc_stream(client, args.tokens)))
                speed = {p: statistics.median(n / t for t, _, n in r) for p, r in rows.items()}
                ttft = {p: statistics.median(x for _, x, _ in r) * 1000 for p, r in rows.items()}
                print(f"single stream, {args.tokens} tokens, median of {args.rounds} alternating rounds")
                for p in ("grpc", "http"):
                    print(f"  {p:5s} {speed[p]:7.1f} tok/s   TTFT {ttft[p]:6.1f} ms")
                print(f"  ratio HTTP/gRPC tokens/s: {speed['http'] / speed['grpc']:.3f}x (target >= 0.95x)")

                async def one() -> tuple[float, float, int] | BaseException:
                    try:
                        return await http_stream(h, http_url, args.client_tokens)
                    except Exception as exc:  # noqa: BLE001 - counted, reported
                        return exc

                t0 = time.perf_counter()
                results = await asyncio.gather(*(one() for _ in range(args.clients)))
                wall = time.perf_counter() - t0
                errors = [r for r in results if isinstance(r, BaseException)]
                ok = [r for r in results if not isinstance(r, BaseException)]
                total = sum(n for _, _, n in ok)
                ttfts = sorted(x for _, x, _ in ok)
                print(f"{args.clients} concurrent HTTP streams of {args.client_tokens} tokens: errors {len(errors)}, "
                      f"{total} tokens in {wall:.1f}s = {total / wall:.1f} tok/s aggregate, "
                      f"TTFT p50 {ttfts[len(ttfts) // 2] * 1000:.0f} ms p99 "
                      f"{ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000:.0f} ms")
                for e in errors[:3]:
                    print(f"  error: {type(e).__name__}: {e}")
            await client.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--client-tokens", type=int, default=32, help="tokens per concurrent client")
    ap.add_argument("--timeout", type=float, default=600, help="per-request read timeout (seconds)")
    asyncio.run(main(ap.parse_args()))
