"""What the lifecycle gate costs and what it keeps: Free/LoadModel under streaming load.

One ``inferd serve --backend llama-cpp`` process (Threads 1). Phase 1 (baseline): Health
latency from a prober while the server is idle. Phase 2: ``--streams`` clients run
PredictStream back to back while another client loops Free -> LoadModel; the prober keeps
measuring Health. Reported: Health p50/p99 in both phases (ratio: Health must not wait for
the gate, the drain or the load), Free latency (drain + unload) and LoadModel latency, and
the streams' outcomes (OK, UNAVAILABLE "model is being unloaded"/"loaded", FAILED_PRECONDITION
between Free and LoadModel; anything else is counted as "other" and should be 0).

    python bench/lifecycle_gate.py [--seconds 10] [--streams 4] [--pause 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from inferd.proto import backend_pb2 as pb  # noqa: E402
from inferd.proto import backend_pb2_grpc  # noqa: E402
from tests.helpers import spawned_server  # noqa: E402

LOAD = pb.ModelOptions(Threads=1, ContextSize=512, MMap=True, Options=["parallel:4"])
PROMPT = pb.PredictOptions(Prompt="Once upon a time", Tokens=16, Temperature=0.0, IgnoreEOS=True)


def q(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else float("nan")


def probe(stub: backend_pb2_grpc.BackendStub, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        stub.Health(pb.HealthMessage(), timeout=10)
        out.append(time.perf_counter() - t0)
        time.sleep(0.005)


def streamer(stub: backend_pb2_grpc.BackendStub, stop: threading.Event, outcomes: collections.Counter) -> None:
    while not stop.is_set():
        try:
            for _ in stub.PredictStream(PROMPT, timeout=60):
                pass
            outcomes["OK"] += 1
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION):
                outcomes[code.name] += 1
                time.sleep(0.05)
            else:
                outcomes[f"other: {code.name} {exc.details()}"] += 1


def cycler(stub: backend_pb2_grpc.BackendStub, stop: threading.Event, frees: list[float], loads: list[float],
           pause: float) -> None:
    while not stop.is_set():
        time.sleep(pause)  # let the streams run on the loaded model
        t0 = time.perf_counter()
        stub.Free(pb.HealthMessage(), timeout=120)
        frees.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = stub.LoadModel(LOAD, timeout=300)
        loads.append(time.perf_counter() - t0)
        assert result.success, result.message


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--pause", type=float, default=2.0, help="seconds the model stays loaded between cycles")
    args = ap.parse_args()
    with spawned_server("--backend", "llama-cpp", "--load-on-start", "false", "--log-level", "warning") as (proc, addr):
        with grpc.insecure_channel(addr) as channel:
            stub = backend_pb2_grpc.BackendStub(channel)
            assert stub.LoadModel(LOAD, timeout=300).success
            idle: list[float] = []
            stop = threading.Event()
            t = threading.Thread(target=probe, args=(stub, stop, idle))
            t.start()
            time.sleep(min(3.0, args.seconds))
            stop.set()
            t.join()

            busy: list[float] = []
            frees: list[float] = []
            loads: list[float] = []
            outcomes: collections.Counter = collections.Counter()
            stop = threading.Event()
            threads = [threading.Thread(target=probe, args=(stub, stop, busy)),
                       threading.Thread(target=cycler, args=(stub, stop, frees, loads, args.pause))]
            threads += [threading.Thread(target=streamer, args=(stub, stop, outcomes)) for _ in range(args.streams)]
            for th in threads:
                th.start()
            time.sleep(args.seconds)
            stop.set()
            for th in threads:
                th.join(300)
            alive = proc.poll() is None
    print(f"llama-cpp, Threads 1, {args.streams} streams, Free/LoadModel loop for {args.seconds:g}s; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("                         |  p50 ms |  p99 ms |   n")
    print(f"Health, idle             | {q(idle, .5):7.2f} | {q(idle, .99):7.2f} | {len(idle)}")
    print(f"Health, streams + cycles | {q(busy, .5):7.2f} | {q(busy, .99):7.2f} | {len(busy)}")
    print(f"Free (drain + unload)    | {q(frees, .5):7.1f} | {max(frees, default=0) * 1000:7.1f} | {len(frees)}  (max)")
    print(f"LoadModel                | {q(loads, .5):7.1f} | {max(loads, default=0) * 1000:7.1f} | {len(loads)}  (max)")
    ratio = statistics.median(busy) / statistics.median(idle) if idle and busy else float("nan")
    print(f"Health p50 ratio busy/idle: {ratio:.2f}x; stream outcomes: {dict(outcomes)}; server alive: {alive}")


if __name__ == "__main__":
    main()
