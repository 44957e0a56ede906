"""Scale-out proof: SmolLM2 on llama-cpp (Threads 1) as 2 Ray Serve replicas behind Ray's gRPC proxy.

One single-node Ray (``inferd ray deploy`` as a subprocess, its own session directory) serves
the module, with two applications (SmolLM2 x2, and silero-vad autoscaled, so every call picks
its model with the ``application`` metadata) and the OpenAI HTTP front (``--openai``); it is torn down even when a test fails: SIGINT to the deploy process (which runs
serve.shutdown() and ray.shutdown()), then every process of that Ray session is killed.

The proof: clients stream requests through the proxy, one replica's process is SIGKILLed
while streams are in flight; every request completes (the client's RetryPolicy retries the
streams the dead replica was serving), Ray replaces the replica, and zero requests are lost.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

pytest.importorskip("ray")
pytest.importorskip("llama_cpp")
psutil = pytest.importorskip("psutil")

from inferd.client import ChannelOptions, RetryPolicy, RpcError, new_client  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402
from inferd.proto import llm_pb2, llm_pb2_grpc  # noqa: E402
from tests.helpers import free_port, inferd_env  # noqa: E402

APP = "smol"
VAD = "vad"  # a second model (another backend, autoscaled): calls pick the application by metadata
TOKENS = 40
MODELS_YAML = f"""
models:
  - name: {APP}
    backend: llama-cpp
    options: {{Threads: 1, ContextSize: 1024}}
    ray:
      num_replicas: 2
      num_cpus: 1
      health_check_period_s: 1
  - name: {VAD}
    backend: silero-vad
    ray:
      autoscaling: {{min_replicas: 1, max_replicas: 2, target_ongoing_requests: 4}}
      num_cpus: 0.5
      memory: 256MiB
"""
ON_APP = ChannelOptions(metadata=(("application", APP),))


class Cluster:
    def __init__(self, proc: subprocess.Popen, address: str, ray_address: str, session: str) -> None:
        self.proc = proc
        self.address = address
        self.ray_address = ray_address
        self.session = session
        self.http = ""

    def replica_pids(self, app: str = APP) -> set[int]:
        """Processes of this session's replicas of ``app`` (children of its raylet)."""
        pids = set()
        for raylet in _session_processes(self.session):
            for child in _children(raylet):
                try:
                    if f"ServeReplica:{app}:" in " ".join(child.cmdline()):
                        pids.add(child.pid)
                except psutil.Error:
                    continue
        return pids


def _children(proc):
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _session_processes(session: str):
    """Ray's daemons of one session carry its directory on their command line."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if session in cmd and p.pid != os.getpid():
            found.append(p)
    return found


def _kill_session(session: str) -> None:
    """Kill every process of the session (raylet, GCS, workers) left after a shutdown."""
    victims = []
    for p in _session_processes(session):
        victims += [*_children(p), p]
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=10)


@pytest.fixture(scope="module")
def cluster():
    session = tempfile.mkdtemp(prefix="iray", dir="/tmp")  # short: Ray's socket paths must fit
    config = Path(session) / "models.yaml"
    config.write_text(MODELS_YAML)
    port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "inferd.cli", "ray", "deploy", str(config), "--grpc-port", str(port),
           "--http-port", str(http_port), "--num-cpus", "4", "--temp-dir", session, "--openai"]
    errors = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True,
                            env=inferd_env(RAY_USAGE_STATS_ENABLED="0"))
    try:
        lines = _read_until(proc, errors, "inferd: applications", timeout=150)
        grpc_line = next(line for line in lines if line.startswith("inferd: ray grpc on "))
        ray_line = next(line for line in lines if line.startswith("inferd: ray cluster at "))
        assert grpc_line.rsplit(":", 1)[1] == str(port)
        assert f"inferd: openai http on 127.0.0.1:{http_port}" in lines
        cluster = Cluster(proc, f"127.0.0.1:{port}", ray_line.split(" at ", 1)[1], session)
        cluster.http = f"http://127.0.0.1:{http_port}"
        yield cluster
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the CLI runs serve.shutdown() and ray.shutdown()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _kill_session(session)
        shutil.rmtree(session, ignore_errors=True)


def _read_until(proc: subprocess.Popen, errors, marker: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    lines = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            lines.append(line.strip())
            if line.startswith(marker):
                return lines
        elif proc.poll() is not None:
            errors.seek(0)
            raise RuntimeError(f"inferd ray deploy exited {proc.returncode}: {errors.read()[-3000:]}")
    raise TimeoutError(f"inferd ray deploy did not get ready in {timeout}s: {lines}")


def _request() -> pb.PredictOptions:
    return pb.PredictOptions(Prompt="Count from one to fifty: one, two,", Tokens=TOKENS, IgnoreEOS=True,
                             Temperature=0.0, TopK=1, Seed=1)


async def test_replica_killed_mid_run_loses_no_request(cluster: Cluster) -> None:
    retries: list[tuple[str, grpc.StatusCode]] = []
    policy = RetryPolicy(max_attempts=6, initial_backoff=0.2, replay_streams=True,
                         on_retry=lambda rpc, exc, n: retries.append((rpc, exc.code)))
    client = new_client(cluster.address, parallel=True, retry=policy, options=ON_APP)
    before = cluster.replica_pids()
    assert len(before) == 2, before
    progress: dict[int, int] = {}
    results: dict[int, pb.Reply] = {}

    async def one(i: int) -> None:
        last = None
        async for reply in client.call_stream("PredictStream", _request(), timeout=90):
            progress[i] = progress.get(i, 0) + 1
            last = reply
        results[i] = last

    try:
        # 8 requests in flight (4 per replica), then 4 more queued behind them.
        tasks = [asyncio.create_task(one(i)) for i in range(12)]
        while sum(1 for n in progress.values() if n >= 3) < 4:  # streams are well under way
            await asyncio.sleep(0.05)
            assert not any(t.done() and t.exception() for t in tasks), [t.exception() for t in tasks if t.done()]
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=100)
        # Zero lost: every request ended with its full generation.
        assert sorted(results) == list(range(12))
        assert all(r is not None and r.tokens == TOKENS for r in results.values()), \
            {i: r.tokens for i, r in results.items()}
        # The kill did hit calls in flight, and the client retried them (Ray reports the lost
        # replica as INTERNAL "actor died"; a request routed to it meanwhile gets UNAVAILABLE).
        assert retries, "no request was retried: the kill did not hit a call in flight"
        assert {rpc for rpc, _ in retries} == {"PredictStream"}
        # Ray replaces the replica.
        deadline = time.monotonic() + 60
        while True:
            now = cluster.replica_pids()
            if len(now) == 2 and victim not in now:
                break
            assert time.monotonic() < deadline, f"replica not replaced: {now}"
            await asyncio.sleep(0.5)
        # ... and both replicas serve again.
        tail = await asyncio.gather(*(client.call("Predict", _request(), timeout=60) for _ in range(4)))
        assert all(r.tokens == TOKENS for r in tail)
    finally:
        await client.close()


async def test_statuses_and_llm_service_through_the_proxy(cluster: Cluster) -> None:
    client = new_client(cluster.address, parallel=True, options=ON_APP)
    try:
        assert (await client.call("Health")).message == b"OK"
        assert (await client.call("Status")).state == pb.StatusResponse.READY
        with pytest.raises(RpcError) as bad:
            await client.call("Predict", Prompt="x", Tokens=-5)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and "Tokens" in bad.value.details
        with pytest.raises(RpcError) as missing:
            await client.call("GenerateVideo", pb.GenerateVideoRequest())
        assert missing.value.code == grpc.StatusCode.UNIMPLEMENTED
        # The deployment owns the model: the same model is a no-op, another one and Free are refused.
        assert (await client.call("LoadModel", pb.ModelOptions())).success
        with pytest.raises(RpcError) as other:
            await client.call("LoadModel", Model="/elsewhere/other.gguf")
        assert other.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(RpcError) as free:
            await client.call("Free")
        assert free.value.code == grpc.StatusCode.FAILED_PRECONDITION
        tokens = await client.call("TokenizeString", Prompt="Hello world")
        assert tokens.length > 0
    finally:
        await client.close()
    # The other application: its own backend, picked by the metadata; an unknown one is NOT_FOUND.
    vad = new_client(cluster.address, parallel=True, options=ChannelOptions(metadata=(("application", VAD),)))
    nowhere = new_client(cluster.address, parallel=True, options=ChannelOptions(metadata=(("application", "x"),)))
    try:
        assert (await vad.call("Status")).state == pb.StatusResponse.READY
        segments = await vad.call("VAD", pb.VADRequest(audio=[0.0] * 16000))
        assert list(segments.segments) == []  # one second of silence
        with pytest.raises(RpcError) as other_backend:
            await vad.call("Predict", Prompt="x")
        assert other_backend.value.code == grpc.StatusCode.UNIMPLEMENTED and "silero-vad" in other_backend.value.details
        with pytest.raises(RpcError) as unknown:
            await nowhere.call("Health")
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        assert len(cluster.replica_pids(VAD)) == 1  # autoscaling's min_replicas, nothing in flight
    finally:
        await vad.close()
        await nowhere.close()
    # entity.grpc.LLMService through the same proxy, with Ray's application metadata. Generate has
    # no token limit: take 5 pieces and cancel (the replica stops generating).
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = llm_pb2_grpc.LLMServiceStub(channel)
        call = stub.Generate(llm_pb2.GenerateRequest(prompt="The capital of France is"),
                             metadata=(("application", APP),), timeout=60)
        pieces = []
        async for reply in call:
            pieces.append(reply.token)
            if len(pieces) == 5:
                call.cancel()
                break
    assert len(pieces) == 5 and "".join(pieces).strip()


async def test_openai_front_as_ray_http_ingress(cluster: Cluster) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=cluster.http, timeout=60) as http:
        listed = (await http.get("/v1/models")).json()
        assert {m["id"] for m in listed["data"]} == {APP, VAD}
        reply = await http.post("/v1/chat/completions", json={
            "model": APP, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"].strip()
        missing = await http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert missing.status_code == 404


def test_inferd_call_and_ray_shutdown(cluster: Cluster) -> None:
    env = inferd_env(RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-m", "inferd.cli", "call", "PredictStream",
                          '{"Prompt": "Hi", "Tokens": 4, "IgnoreEOS": true}', "--addr", cluster.address,
                          "--metadata", f"application={APP}", "--retries", "2"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) >= 1
    down = subprocess.run([sys.executable, "-m", "inferd.cli", "ray", "shutdown", "--address", cluster.ray_address],
                          capture_output=True, text=True, env=env, timeout=90)
    assert down.returncode == 0, down.stderr
    assert cluster.proc.wait(timeout=30) == 0  # deploy noticed and tore down its Ray
