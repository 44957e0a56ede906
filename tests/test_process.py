"""The server as a process: settings errors, SIGTERM with a stream in flight, parent death, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from inferd.client import RpcError, new_sync_client
from tests.helpers import ROOT, free_port, spawned_server

ECHO = ("--backend", "tests.fixtures_backend:EchoBackend", "--model", "test-model")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _inferd(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inferd.cli", *args], capture_output=True, text=True, timeout=timeout, env=env or ENV
    )


@pytest.mark.parametrize(
    "args,env,fragment",
    [
        (["--port", "70000"], {}, "GRPC_PORT: must be 0-65535"),
        (["--max-workers", "zero"], {}, "--max-workers: expected int"),
        ([], {"GRPC_REQUIRE_API_KEY": "true"}, "GRPC_API_KEY is empty"),
        ([], {"GRPC_USE_TLS": "yes", "GRPC_CERT_FILE": "/nope.crt"}, "GRPC_CERT_FILE"),
        ([], {"GRPC_ENABLE_REFLECTION": "maybe"}, "GRPC_ENABLE_REFLECTION: expected true/false"),
        (["--addr", "nonsense"], {}, "--addr: expected HOST:PORT"),
        (["--backend", "no-such-backend"], {}, "unknown backend 'no-such-backend'"),
    ],
)
def test_invalid_settings_fail_with_one_line(args, env, fragment):
    r = _inferd("serve", *args, env={**ENV, **env})
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0], r.stderr


def test_bad_startup_model_exits_nonzero_with_reason():
    r = _inferd("serve", "--backend", "tests.fixtures_backend:EchoBackend", "--model", "/no/such.gguf", "--port", "0")
    assert r.returncode == 1 and "failed to load the model" in r.stderr and "not found" in r.stderr


def test_sigterm_lets_inflight_stream_finish_then_exits():
    with spawned_server(*ECHO, "--shutdown-grace", "5") as (proc, addr):
        client = new_sync_client(addr)
        words = " ".join(f"w{i}" for i in range(20))
        stream = client.predict_stream(Prompt=f"slow:0.05 {words}")
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the in-flight stream completes within the grace period
        assert [first, *rest][-1].message == b"w19 "
        assert len(rest) == 19
        assert proc.wait(timeout=10) == 0
        client.close()


def test_sigterm_cancels_calls_that_outlive_the_grace_period():
    with spawned_server(*ECHO, "--shutdown-grace", "0.5") as (proc, addr):
        client = new_sync_client(addr)
        stream = client.predict_stream(Prompt="slow:1 " + " ".join(["w"] * 60))
        next(stream)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(RpcError) as err:
            list(stream)
        assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - t0 < 5
        client.close()


def test_exits_when_parent_dies():
    port = free_port()
    # a shell parent starts the server in the background and exits at once
    code = (
        f"{sys.executable} -m inferd.cli serve {' '.join(ECHO)} --port {port} --watch-parent true "
        f"> /dev/null 2>&1 & echo $!; sleep 2"
    )
    parent = subprocess.Popen(["bash", "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    child_pid = int(parent.stdout.readline())
    parent.wait(timeout=10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(child_pid, signal.SIGKILL)
    pytest.fail("server outlived its parent")


def test_localai_style_addr_flag_and_cli_client():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferd.cli", f"--addr=127.0.0.1:{port}", *ECHO],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, "INFERD_WATCH_PARENT": "false"},
    )
    try:
        assert "listening on 127.0.0.1" in proc.stdout.readline()
        addr = f"127.0.0.1:{port}"
        r = _inferd("health", "--addr", addr)
        assert r.returncode == 0 and "OK" in r.stdout
        r = _inferd("status", "--addr", addr)
        assert r.returncode == 0 and "READY" in r.stdout and "rss" in r.stdout
        r = _inferd("call", "Predict", '{"Prompt": "hi"}', "--addr", addr)
        assert r.returncode == 0 and json.loads(r.stdout)["message"] == "aGk="  # base64 of "hi"
        r = _inferd("call", "PredictStream", '{"Prompt": "a b c"}', "--addr", addr)
        assert [json.loads(line)["message"] for line in r.stdout.splitlines()] == ["YSA=", "YiA=", "YyA="]
        r = _inferd("call", "Rerank", '{"query": "q"}', "--addr", addr)
        assert r.returncode == 1 and "UNIMPLEMENTED" in r.stderr
        r = _inferd("call", "Predict", '{"Nope": 1}', "--addr", addr)
        assert r.returncode == 2 and "not a valid PredictOptions" in r.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_sync_client_over_network():
    with spawned_server(*ECHO) as (_proc, addr):
        with new_sync_client(addr) as client:
            assert client.health_check()
            assert client.predict(Prompt="sync").message == b"sync"
            assert [r.message for r in client.predict_stream(Prompt="x y")] == [b"x ", b"y "]
