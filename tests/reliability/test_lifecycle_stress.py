"""Defect 2's stress: model rpcs hammered while Free/LoadModel loop, on every built-in backend.

For each of llama-cpp, sentence-embeddings and local-store (all at once, for
``INFERD_STRESS_SECONDS``, 60 by default): four client threads call the backend's model rpcs
without pause while a fifth loops Free / LoadModel. The first milestone's llama-cpp died of
SIGABRT ("pure virtual method called") within seconds of this. Every process must live to the
end; every reply must be OK or a deliberate status: FAILED_PRECONDITION (no model loaded right
now), UNAVAILABLE from the server saying the model is being unloaded/loaded (not a dropped
connection), ABORTED/CANCELLED for a stream cut by the unload, RESOURCE_EXHAUSTED for a full
queue. Never INTERNAL, UNKNOWN, or a call hanging to its deadline. Every LoadModel succeeds.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import Counter

import grpc
import pytest
from google.protobuf.message import Message

from inferd.proto import backend_pb2 as pb
from tests.reliability.fuzz_runner import deliberate
from tests.reliability.servers import BackendUnavailable, ServerProc, serving

SECONDS = float(os.environ.get("INFERD_STRESS_SECONDS", "60"))
CALL_TIMEOUT = 30.0

#: Model rpcs per backend, with a cheap request each.
HAMMER: dict[str, list[tuple[str, Message]]] = {
    "llama-cpp": [
        ("Predict", pb.PredictOptions(Prompt="Hello", Tokens=6, IgnoreEOS=True)),
        ("PredictStream", pb.PredictOptions(Prompt="Once upon a time", Tokens=8, IgnoreEOS=True)),
        ("Embedding", pb.PredictOptions(Embeddings="hello world")),
        ("TokenizeString", pb.PredictOptions(Prompt="hello world")),
    ],
    "sentence-embeddings": [
        ("Embedding", pb.PredictOptions(Embeddings="hello world")),
        ("TokenizeString", pb.PredictOptions(Prompt="hello world")),
        ("Rerank", pb.RerankRequest(query="cat", documents=["a cat", "a dog"], top_n=1)),
    ],
    "local-store": [
        ("StoresSet", pb.StoresSetOptions(Keys=[pb.StoresKey(Floats=[0.1, 0.2, 0.3])],
                                          Values=[pb.StoresValue(Bytes=b"v")])),
        ("StoresGet", pb.StoresGetOptions(Keys=[pb.StoresKey(Floats=[0.1, 0.2, 0.3])])),
        ("StoresFind", pb.StoresFindOptions(Key=pb.StoresKey(Floats=[0.1, 0.2, 0.3]), TopK=1)),
        ("StoresDelete", pb.StoresDeleteOptions(Keys=[pb.StoresKey(Floats=[0.3, 0.2, 0.1])])),
    ],
}
DELIBERATE = frozenset({"OK", "FAILED_PRECONDITION", "ABORTED", "CANCELLED", "RESOURCE_EXHAUSTED"})


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.codes: Counter = Counter()
        self.bad: list[str] = []

    def add(self, backend: str, rpc: str, code: grpc.StatusCode, details: str) -> None:
        ok = code.name in DELIBERATE or (code == grpc.StatusCode.UNAVAILABLE and deliberate(code, details))
        with self.lock:
            self.codes[f"{backend} {rpc} {code.name}"] += 1
            if not ok and len(self.bad) < 30:
                self.bad.append(f"{backend} {rpc}: {code.name}: {details}")


def _call(server: ServerProc, rpc: str, request: Message) -> tuple[grpc.StatusCode, str]:
    from inferd.protocol import RPCS

    info = RPCS[rpc]
    try:
        if info.streaming:
            method = server.channel().unary_stream(info.path, info.request.SerializeToString,
                                                   info.response.FromString)
            for _ in method(request, timeout=CALL_TIMEOUT):
                pass
        else:
            server.unary(rpc, request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _hammer(server: ServerProc, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    calls = HAMMER[server.backend]
    while not stop.is_set():
        rpc, request = rng.choice(calls)
        code, details = _call(server, rpc, request)
        tally.add(server.backend, rpc, code, details)
        if code != grpc.StatusCode.OK:
            time.sleep(0.005)  # refused while the model is away: retry soon, without spinning a core


def _cycle(server: ServerProc, stop: threading.Event, tally: Tally, failures: list[str], seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        time.sleep(rng.uniform(0.0, 0.3))
        code, details = _call(server, "Free", pb.HealthMessage())
        tally.add(server.backend, "Free", code, details)
        time.sleep(rng.uniform(0.0, 0.1))
        try:
            result = server.load(timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            tally.add(server.backend, "LoadModel", exc.code(), exc.details() or "")
            continue
        tally.add(server.backend, "LoadModel", grpc.StatusCode.OK, "")
        if not result.success and len(failures) < 10:
            failures.append(f"{server.backend}: LoadModel failed during the stress: {result.message}")


def test_free_and_load_while_model_rpcs_run_never_kill_the_process() -> None:
    with contextlib.ExitStack() as stack:
        try:
            servers = [stack.enter_context(serving(name)) for name in HAMMER]
        except BackendUnavailable as exc:
            pytest.skip(str(exc))
        stop = threading.Event()
        tally = Tally()
        failures: list[str] = []
        threads = []
        for n, server in enumerate(servers):
            threads += [threading.Thread(target=_hammer, args=(server, stop, tally, 100 * n + i), daemon=True)
                        for i in range(4)]
            threads.append(threading.Thread(target=_cycle, args=(server, stop, tally, failures, n), daemon=True))
        for t in threads:
            t.start()
        end = time.monotonic() + SECONDS
        died = []
        while time.monotonic() < end and not died:
            time.sleep(0.5)
            died = [s for s in servers if not s.alive()]
        stop.set()
        for t in threads:
            t.join(timeout=CALL_TIMEOUT + 5)
        summary = "\n".join(f"  {k}: {v}" for k, v in sorted(tally.codes.items()))
        print(f"\nreplies over {SECONDS:.0f}s:\n{summary}")
        for server in died:
            pytest.fail(f"{server.backend} died (exit {server.proc.returncode}) during the stress:\n"
                        f"{server.stderr_tail()}")
        assert not [t for t in threads if t.is_alive()], "a client thread hung past its deadline"
        assert not tally.bad, "non-deliberate replies:\n" + "\n".join(tally.bad)
        assert not failures, "\n".join(failures)
        for server in servers:
            assert server.alive() and server.health(), f"{server.backend} stopped answering Health"
            assert server.load().success
            rpc, request = HAMMER[server.backend][0]
            assert _call(server, rpc, request)[0] == grpc.StatusCode.OK, f"{server.backend} {rpc} after the stress"
        counts: Counter = Counter()
        for key, n in tally.codes.items():
            backend, rpc, code = key.split()
            if code == "OK" and rpc not in ("Free", "LoadModel"):
                counts[backend] += n
        for server in servers:  # the stress really ran calls against a loaded model
            assert counts[server.backend] > 20, f"{server.backend}: only {counts[server.backend]} OK replies"
