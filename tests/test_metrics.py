"""``inferd serve --metrics-port N --log-format json``: Prometheus metrics and JSON access logs.

A real server process (the echo fixture backend) is called over gRPC, then /metrics is
scraped and parsed with prometheus-client's own parser, and the JSON log lines are read
back. The llama-cpp gauges (slots, queue depth) are checked in-process on SmolLM2.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import grpc
import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from inferd.client import ChannelOptions, RpcError, new_sync_client  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402
from tests.helpers import free_port, running_server, spawned_server  # noqa: E402

ECHO = "tests.fixtures_backend:EchoBackend"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab))


def test_serve_metrics_and_json_logs(tmp_path: Any) -> None:
    port = free_port()
    with spawned_server("--backend", ECHO, "--model", "test-model", "--metrics-port", str(port),
                        "--log-format", "json") as (proc, address):
        opts = ChannelOptions(metadata=(("x-correlation-id", "corr-42"),))
        with new_sync_client(address, parallel=True, options=opts) as c:
            for _ in range(3):
                assert c.predict(Prompt="three word prompt").tokens == 3
            assert [r.message for r in c.predict_stream(Prompt="a b")] == [b"a ", b"b "]
            with pytest.raises(RpcError) as exc:
                c.predict(Prompt="x", Tokens=-1)
            assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(RpcError):
                c.embedding(Embeddings="x")  # UNIMPLEMENTED on echo
        samples = scrape(port)
        proc.terminate()
        proc.wait(timeout=20)
        assert proc.stdout is not None
        stdout = proc.stdout.read()
    assert f"inferd: metrics on 127.0.0.1:{port}" in stdout  # the line after "listening on"
    assert value(samples, "inferd_requests_total", front="grpc", method="Predict", code="OK") == 3
    assert value(samples, "inferd_requests_total", method="Predict", code="INVALID_ARGUMENT") == 1
    assert value(samples, "inferd_requests_total", method="Embedding", code="UNIMPLEMENTED") == 1
    assert value(samples, "inferd_requests_total", method="PredictStream", code="OK") == 1
    assert value(samples, "inferd_request_duration_seconds_count", method="Predict") == 4
    assert value(samples, "inferd_generated_tokens_total", front="grpc", model="test-model") == 9
    assert value(samples, "inferd_time_to_first_token_seconds_count", model="test-model") == 1
    assert value(samples, "inferd_model_loaded", backend="echo", model="test-model") == 1
    assert value(samples, "inferd_requests_in_flight", method="Predict") == 0
    assert value(samples, "inferd_model_load_seconds_count") == 1  # the start-up LoadModel
    assert value(samples, "process_resident_memory_bytes") > 10e6


def test_json_access_log_lines(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT, inferd_env

    port = free_port()
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", "serve", "--backend", ECHO, "--model",
                                 "test-model", "--port", str(port), "--log-format", "json"],
                                stdout=subprocess.PIPE, stderr=err, env=inferd_env(), text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None and "listening on" in proc.stdout.readline()
        opts = ChannelOptions(metadata=(("x-correlation-id", "corr-42"),))
        with new_sync_client(f"127.0.0.1:{port}", options=opts) as c:
            c.predict(Prompt="hello")
        time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
    calls = [x for x in lines if x.get("rpc") == "Predict"]
    assert len(calls) == 1
    call = calls[0]
    assert call["correlation_id"] == "corr-42" and call["model"] == "test-model" and call["code"] == "OK"
    assert call["front"] == "grpc" and call["duration_ms"] >= 0
    assert os.path.getsize(log) > 0


async def test_llama_slot_and_queue_gauges() -> None:
    pytest.importorskip("llama_cpp")
    from inferd.backends.llama_cpp import LlamaCppBackend
    from inferd.client import new_client

    port = free_port()
    async with running_server(LlamaCppBackend(), metrics_port=port) as server:
        assert (await server.load(pb.ModelOptions(ContextSize=1024, Threads=1))).success
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        try:
            replies = [r async for r in client.predict_stream(Prompt="Hello", Tokens=8, IgnoreEOS=True)]
            assert replies[-1].tokens == 8
        finally:
            await client.close()
        import asyncio

        samples = await asyncio.to_thread(scrape, port)
    assert value(samples, "inferd_slots_total", backend="llama-cpp") >= 1
    assert value(samples, "inferd_slots_in_use", backend="llama-cpp") == 0
    assert value(samples, "inferd_queue_depth", backend="llama-cpp") == 0
    assert value(samples, "inferd_generated_tokens_total", front="grpc") == 8
    assert value(samples, "inferd_generation_tokens_per_second", front="grpc") > 0
    assert value(samples, "inferd_model_load_seconds_count") == 0  # loaded in-process, not by LoadModel rpc
