"""Load and soak: N concurrent clients mixing Predict, PredictStream, Embedding and Stores*.

Three server processes (llama-cpp for Predict/PredictStream, sentence-embeddings for
Embedding, local-store for Stores*) are driven by ``clients`` asyncio tasks for a fixed time.
What is measured, per level of concurrency:

* calls, replies by status, transport errors (anything but OK and RESOURCE_EXHAUSTED: a
  refusal past a bound is deliberate, a reset stream or INTERNAL is not), p50/p99 latency;
* each server's RSS after the warm-up third of the run and at its end (growth must stay under
  5 %: the store's keys come from a fixed pool, so its data does not grow);
* each server's threads and open file descriptors when idle before the level and once the
  level has drained (they must come back to the baseline: no leaked threads, sockets, files).

Used by tests/reliability/test_soak.py (one short level) and bench/soak.py (16/64/256).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
from google.protobuf.message import Message

from inferd.proto import backend_pb2 as pb
from inferd.protocol import RPCS
from tests.reliability.servers import ServerProc

DELIBERATE_UNDER_LOAD = frozenset({grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED})
KEY_POOL = 256
DIM = 16
#: Relative weight of each operation in the mix.
MIX = (("Predict", 2), ("PredictStream", 2), ("Embedding", 4), ("StoresSet", 2), ("StoresGet", 2),
       ("StoresFind", 3), ("StoresDelete", 1))
SERVER_FOR = {"Predict": "llama-cpp", "PredictStream": "llama-cpp", "Embedding": "sentence-embeddings",
              "StoresSet": "local-store", "StoresGet": "local-store", "StoresFind": "local-store",
              "StoresDelete": "local-store"}
PROMPTS = ("Tell me a story", "What is gRPC?", "Count to five", "Name a colour", "Say hello")


def _key(i: int) -> pb.StoresKey:
    rng = random.Random(i)
    return pb.StoresKey(Floats=[rng.uniform(-1, 1) for _ in range(DIM)])


def request_for(op: str, rng: random.Random) -> Message:
    if op in ("Predict", "PredictStream"):
        return pb.PredictOptions(Prompt=rng.choice(PROMPTS), Tokens=8, Temperature=0.0, IgnoreEOS=True)
    if op == "Embedding":
        return pb.PredictOptions(Embeddings=" ".join(rng.choice(PROMPTS) for _ in range(rng.randint(1, 4))))
    keys = [_key(rng.randrange(KEY_POOL)) for _ in range(rng.randint(1, 4))]
    if op == "StoresSet":
        return pb.StoresSetOptions(Keys=keys, Values=[pb.StoresValue(Bytes=rng.randbytes(32)) for _ in keys])
    if op == "StoresGet":
        return pb.StoresGetOptions(Keys=keys)
    if op == "StoresDelete":
        return pb.StoresDeleteOptions(Keys=keys[:1])
    return pb.StoresFindOptions(Key=keys[0], TopK=5)


@dataclass
class ProcessSample:
    rss: int
    threads: int
    fds: int
    thread_names: Counter = field(default_factory=Counter, repr=False)

    def thread_diff(self, later: ProcessSample) -> dict[str, int]:
        """Threads by kernel name that ``later`` has more of (grpc names its pools; Python's are "python")."""
        return {k: later.thread_names[k] - self.thread_names.get(k, 0)
                for k in later.thread_names if later.thread_names[k] > self.thread_names.get(k, 0)}


def thread_names(pid: int) -> Counter:
    names: Counter = Counter()
    for comm in Path(f"/proc/{pid}/task").glob("*/comm"):
        with contextlib.suppress(OSError):
            names[comm.read_text().strip()] += 1
    return names


def sample(server: ServerProc) -> ProcessSample:
    p = psutil.Process(server.proc.pid)
    return ProcessSample(p.memory_info().rss, p.num_threads(), p.num_fds(), thread_names(p.pid))


@dataclass
class ServerFigures:
    idle_before: ProcessSample
    warm: ProcessSample | None = None
    end: ProcessSample | None = None
    idle_after: ProcessSample | None = None

    @property
    def rss_growth(self) -> float:
        if self.warm is None or self.end is None:
            return 0.0
        return (self.end.rss - self.warm.rss) / self.warm.rss


@dataclass
class LevelResult:
    clients: int
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    codes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    errors: list[str] = field(default_factory=list)
    servers: dict[str, ServerFigures] = field(default_factory=dict)

    @property
    def transport_errors(self) -> int:
        return sum(n for counter in self.codes.values() for code, n in counter.items()
                   if code not in ("OK", "RESOURCE_EXHAUSTED"))

    def rows(self) -> list[str]:
        out = []
        for op, _ in MIX:
            lat = sorted(self.latencies.get(op, []))
            codes = self.codes.get(op, Counter())
            calls = sum(codes.values())
            p50 = statistics.median(lat) * 1000 if lat else float("nan")
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")
            bad = calls - codes.get("OK", 0) - codes.get("RESOURCE_EXHAUSTED", 0)
            out.append(f"| {self.clients} | {op} | {calls} | {calls / self.seconds:.1f} | {codes.get('OK', 0)} | "
                       f"{codes.get('RESOURCE_EXHAUSTED', 0)} | {bad} | {p50:.1f} | {p99:.1f} |")
        return out

    def server_rows(self) -> list[str]:
        out = []
        for name, f in self.servers.items():
            after = f.idle_after or f.idle_before
            out.append(f"| {self.clients} | {name} | {f.warm.rss / 2**20 if f.warm else 0:.1f} | "
                       f"{f.end.rss / 2**20 if f.end else 0:.1f} | {f.rss_growth * 100:+.2f} % | "
                       f"{f.idle_before.threads} -> {after.threads} | {f.idle_before.fds} -> {after.fds} |")
        return out


OPS_HEADER = ("| clients | rpc | calls | calls/s | OK | RESOURCE_EXHAUSTED | other (transport) | p50 ms | p99 ms |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
SERVERS_HEADER = ("| clients | server | RSS warm MiB | RSS end MiB | growth | threads idle before -> after | "
                  "fds idle before -> after |\n| --- | --- | --- | --- | --- | --- | --- |")


async def _client(i: int, channels: dict[str, list[grpc.aio.Channel]], stop_at: float,
                  result: LevelResult, timeout: float) -> None:
    rng = random.Random(i)
    ops = [op for op, weight in MIX for _ in range(weight)]
    while time.monotonic() < stop_at:
        op = rng.choice(ops)
        pool = channels[SERVER_FOR[op]]
        channel = pool[i % len(pool)]
        info = RPCS[op]
        request = request_for(op, rng)
        start = time.monotonic()
        try:
            if info.streaming:
                call = channel.unary_stream(info.path, info.request.SerializeToString, info.response.FromString)
                async for _ in call(request, timeout=timeout):
                    pass
            else:
                call = channel.unary_unary(info.path, info.request.SerializeToString, info.response.FromString)
                await call(request, timeout=timeout)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code not in DELIBERATE_UNDER_LOAD and len(result.errors) < 20:
                result.errors.append(f"{op}: {code.name}: {exc.details()}")
        result.codes[op][code.name] += 1
        if code == grpc.StatusCode.OK:
            result.latencies[op].append(time.monotonic() - start)
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            await asyncio.sleep(0.02 + rng.random() * 0.05)  # refused past a bound: back off


async def _settle(servers: dict[str, ServerProc], baseline: dict[str, ServerFigures], timeout: float) -> None:
    """Wait until every server's threads and fds are back to the baseline, or ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        samples = {name: sample(s) for name, s in servers.items()}
        for name, figures in baseline.items():
            figures.idle_after = samples[name]
        done = all(samples[n].threads <= f.idle_before.threads and samples[n].fds <= f.idle_before.fds
                   for n, f in baseline.items())
        if done or time.monotonic() > end:
            return
        await asyncio.sleep(0.25)


async def run_level(servers: dict[str, ServerProc], clients: int, seconds: float, *,
                    timeout: float = 60.0, channels_per_server: int = 8, settle: float = 15.0) -> LevelResult:
    """Run ``clients`` concurrent clients for ``seconds``; sample the servers as described above."""
    result = LevelResult(clients, seconds)
    for name, server in servers.items():
        result.servers[name] = ServerFigures(idle_before=sample(server))
    n_channels = max(1, min(clients, channels_per_server))
    channels = {name: [grpc.aio.insecure_channel(s.address) for _ in range(n_channels)]
                for name, s in servers.items()}
    try:
        start = time.monotonic()
        tasks = [asyncio.ensure_future(_client(i, channels, start + seconds, result, timeout))
                 for i in range(clients)]
        await asyncio.sleep(seconds / 3)
        for name, server in servers.items():
            result.servers[name].warm = sample(server)
        await asyncio.gather(*tasks)
        for name, server in servers.items():
            result.servers[name].end = sample(server)
    finally:
        for pool in channels.values():
            for channel in pool:
                await channel.close()
    await _settle(servers, result.servers, settle)
    return result
