"""The model manager and the watchdog against real child processes (the echo backend).

Every backend here is a real ``inferd serve`` subprocess on a loopback port; the
echo backend's ``Predict(Prompt="block:SECONDS")`` is the stuck call.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from inferd.client import RpcError
from inferd.supervisor.config import ModelSpec, SupervisorConfig
from inferd.supervisor.manager import ModelError, ModelManager
from tests.helpers import ROOT

ECHO = "tests.fixtures_backend:EchoBackend"
ENV = {"PYTHONPATH": str(ROOT)}


def spec(name: str, **kw: object) -> ModelSpec:
    kw.setdefault("model", "test-model")
    return ModelSpec(name, kw.pop("backend", ECHO), env=ENV, **kw)  # type: ignore[arg-type]


def config(tmp_path: Path, *specs: ModelSpec, **kw: object) -> SupervisorConfig:
    kw.setdefault("stop_grace", 2.0)
    kw.setdefault("health_timeout", 30.0)
    return SupervisorConfig(models=specs or (spec("a"),), run_dir=str(tmp_path / "run"), **kw)  # type: ignore[arg-type]


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(cond, timeout: float = 10.0, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def row(m: ModelManager, name: str) -> dict:
    return next(r for r in m.ps() if r["name"] == name)


# ---- spawn, reuse, LRU ----------------------------------------------------------------
def test_spawn_load_and_reuse(tmp_path: Path) -> None:
    with ModelManager(config(tmp_path)) as m:
        client = m.client("a")
        assert client.predict(Prompt="hello").message == b"hello"
        r = row(m, "a")
        assert r["state"] == "ready" and r["backend_state"] == "READY"
        assert r["rss_bytes"] > 10_000_000 and r["idle_seconds"] is not None
        pid, address = r["pid"], r["address"]
        assert m.client("a") is client  # reused: same process, same client
        assert m.ensure("a") == address and row(m, "a")["pid"] == pid and row(m, "a")["restarts"] == 0
    assert not alive(pid)


async def test_async_client_is_marked_by_the_watchdog(tmp_path: Path) -> None:
    with ModelManager(config(tmp_path)) as m:
        client = await m.aclient("a")
        try:
            import asyncio

            call = asyncio.ensure_future(client.predict(Prompt="block:0.6"))
            await asyncio.sleep(0.3)
            assert m.watchdog.in_flight(client.address) == 1
            assert (await call).message == b"block:0.6"
            assert m.watchdog.in_flight(client.address) == 0
        finally:
            await client.close()


def test_lru_eviction_beyond_max_loaded(tmp_path: Path) -> None:
    with ModelManager(config(tmp_path, spec("a"), spec("b"), max_loaded=1)) as m:
        m.client("a").predict(Prompt="x")
        pid_a = row(m, "a")["pid"]
        m.client("b").predict(Prompt="y")
        ra, rb = row(m, "a"), row(m, "b")
        assert ra["state"] == "stopped" and "LRU eviction" in ra["last_event"]
        assert rb["state"] == "ready"
        assert not alive(pid_a)
        # asking for a again evicts b and starts a fresh a
        assert m.model("a").predict(Prompt="z").message == b"z"
        assert row(m, "b")["state"] == "stopped" and row(m, "a")["restarts"] == 1


def test_lru_does_not_evict_a_busy_backend(tmp_path: Path) -> None:
    with ModelManager(config(tmp_path, spec("a"), spec("b"), max_loaded=1)) as m:
        a = m.model("a")
        a.predict(Prompt="warm")
        t = threading.Thread(target=a.predict, kwargs={"Prompt": "block:1.5"})
        t.start()
        assert wait_until(lambda: m.watchdog.in_flight(m.address("a") or "") == 1)
        m.client("b").predict(Prompt="y")  # over the limit rather than killing a's call
        assert row(m, "a")["state"] == "ready" and row(m, "b")["state"] == "ready"
        t.join()


# ---- crashes and the watchdog ------------------------------------------------------------
def test_crash_under_load_restarts_on_next_call(tmp_path: Path) -> None:
    with ModelManager(config(tmp_path)) as m:
        a = m.model("a")
        a.predict(Prompt="warm")
        pid = row(m, "a")["pid"]
        errors: list[BaseException] = []

        def stuck() -> None:
            try:
                a.predict(Prompt="block:20")
            except RpcError as exc:
                errors.append(exc)

        t = threading.Thread(target=stuck)
        t.start()
        assert wait_until(lambda: m.watchdog.in_flight(m.address("a") or "") == 1)
        os.kill(pid, signal.SIGKILL)
        t.join(timeout=10)
        assert not t.is_alive() and errors and errors[0].code == grpc.StatusCode.UNAVAILABLE
        assert a.predict(Prompt="after").message == b"after"  # restarted on demand
        r = row(m, "a")
        assert r["pid"] != pid and r["restarts"] == 1 and r["state"] == "ready"


def test_busy_timeout_kills_a_stuck_call_and_restarts_on_demand(tmp_path: Path, caplog) -> None:
    caplog.set_level("WARNING", logger="inferd.supervisor")
    with ModelManager(config(tmp_path, busy_timeout=0.5, watchdog_interval=0.1)) as m:
        a = m.model("a")
        a.predict(Prompt="warm")
        pid = row(m, "a")["pid"]
        t0 = time.monotonic()
        with pytest.raises(RpcError) as exc:
            a.predict(Prompt="block:30")
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - t0 < 5
        assert not alive(pid)
        assert "busy on one call" in row(m, "a")["last_event"] and row(m, "a")["watchdog_kills"] == 1
        assert any("killing model a" in r.message and "busy timeout 0.5s" in r.message for r in caplog.records)
        assert a.predict(Prompt="again").message == b"again"
        assert row(m, "a")["pid"] != pid


def test_idle_timeout_stops_an_idle_backend(tmp_path: Path, caplog) -> None:
    caplog.set_level("WARNING", logger="inferd.supervisor")
    with ModelManager(config(tmp_path, idle_timeout=0.6, watchdog_interval=0.1)) as m:
        a = m.model("a")
        a.predict(Prompt="block:1.0")  # busy longer than the idle timeout: not idle
        r = row(m, "a")
        pid = r["pid"]
        assert alive(pid) and r["last_event"] == "started"  # the watchdog left the busy backend alone
        assert wait_until(lambda: row(m, "a")["state"] == "stopped", timeout=10)
        assert not alive(pid)
        assert any("stopping model a" in r.message and "idle timeout 0.6s" in r.message for r in caplog.records)
        assert a.predict(Prompt="back").message == b"back"


def test_external_calls_count_as_busy_when_tracked(tmp_path: Path) -> None:
    """``inferd up`` hands out addresses: a call made around the manager must not look idle."""
    from inferd.client import new_sync_client

    cfg = config(tmp_path, idle_timeout=0.6, watchdog_interval=0.1, track_external_calls=True)
    with ModelManager(cfg) as m:
        address = m.ensure("a")
        pid = row(m, "a")["pid"]
        with new_sync_client(address) as outsider:  # no watchdog hooks: invisible to marks
            t = threading.Thread(target=outsider.predict, kwargs={"Prompt": "block:1.5"})
            t.start()
            time.sleep(1.0)  # well past the idle timeout
            r = row(m, "a")
            assert r["last_event"] == "started" and r["busy_seconds"] is not None and r["idle_seconds"] is None
            t.join()
        assert alive(pid)
        assert wait_until(lambda: row(m, "a")["state"] == "stopped", timeout=10)  # idle after it


def test_watchdog_is_off_by_default(tmp_path: Path) -> None:
    with ModelManager(config(tmp_path)) as m:
        assert not m.watchdog.enabled and m.watchdog._thread is None


# ---- failures ----------------------------------------------------------------------------
def test_failed_load_reports_the_backend_message(tmp_path: Path) -> None:
    with ModelManager(config(tmp_path, spec("bad", model=str(tmp_path / "missing.gguf")))) as m:
        with pytest.raises(ModelError, match=r"LoadModel failed: model file not found"):
            m.client("bad")
        r = row(m, "bad")
        assert r["state"] == "failed" and "model file not found" in r["last_error"] and r["pid"] is None


def test_backend_that_never_comes_up_reports_its_log_tail(tmp_path: Path) -> None:
    with ModelManager(config(tmp_path, spec("x", backend="no_such_module:Nope"))) as m:
        with pytest.raises(ModelError) as exc:
            m.ensure("x")
        text = str(exc.value)
        assert "exited with status 2 before listening" in text
        assert "backend log" in text and "no_such_module" in text


def test_port_collision_retries_on_a_free_port(tmp_path: Path, caplog) -> None:
    caplog.set_level("WARNING", logger="inferd.supervisor")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with ModelManager(config(tmp_path, spec("a", port=port))) as m:
            assert m.client("a").predict(Prompt="p").message == b"p"
            assert not m.address("a").endswith(f":{port}")  # type: ignore[union-attr]
            assert any(f"port {port} is in use" in r.message for r in caplog.records)


# ---- children never outlive the manager ---------------------------------------------------
MANAGER_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from inferd.supervisor.config import ModelSpec, SupervisorConfig
    from inferd.supervisor.manager import ModelManager
    env = {"PYTHONPATH": sys.argv[2]}
    echo = "tests.fixtures_backend:EchoBackend"
    cfg = SupervisorConfig(models=(ModelSpec("a", echo, "test-model", env=env),
                                   ModelSpec("b", echo, "test-model", env=env)),
                           run_dir=sys.argv[1], child_shutdown_grace=1.0)
    m = ModelManager(cfg)
    m.start_all()
    print(json.dumps([r["pid"] for r in m.ps()]), flush=True)
    if sys.argv[3] == "exit":
        sys.exit(0)  # no close(): atexit must stop the children
    time.sleep(60)
""")


@pytest.mark.parametrize("how", ["exit", "kill-9"])
def test_no_orphans_when_the_manager_goes_away(tmp_path: Path, how: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", MANAGER_SCRIPT, str(tmp_path / "run"), str(ROOT), how],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 2 and all(alive(p) for p in pids)
        if how == "kill-9":
            proc.kill()
        proc.wait(timeout=20)
        assert wait_until(lambda: not any(alive(p) for p in pids), timeout=10), "backend outlived its manager"
    finally:
        proc.kill()
        proc.wait()


# ---- the CLI: up / ps / stop ------------------------------------------------------------
def test_cli_up_ps_stop(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(textwrap.dedent(f"""
        max_loaded: 2
        watchdog:
          idle_timeout: 10m
        models:
          - name: a
            backend: {ECHO}
            model: test-model
            env: {{PYTHONPATH: {ROOT}}}
          - name: b
            backend: {ECHO}
            model: test-model
            env: {{PYTHONPATH: {ROOT}}}
    """))
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "inferd.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    up = subprocess.Popen([*cli, "up", str(tmp_path / "models.yaml"), "--run-dir", str(run_dir)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        def ps() -> list[dict]:
            out = subprocess.run([*cli, "ps", "--json", "--run-dir", str(run_dir)], capture_output=True,
                                 text=True, env=env)
            return json.loads(out.stdout) if out.returncode == 0 else []

        assert wait_until(lambda: [r["state"] for r in ps()] == ["ready", "ready"], timeout=30)
        rows = ps()
        pids = [r["pid"] for r in rows]
        table = subprocess.run([*cli, "ps", "--run-dir", str(run_dir)], capture_output=True, text=True, env=env)
        assert "NAME" in table.stdout and "ready/ready" in table.stdout and "MiB" in table.stdout
        out = subprocess.run([*cli, "stop", "a", "--run-dir", str(run_dir)], capture_output=True, text=True, env=env)
        assert out.returncode == 0 and "a stopped" in out.stdout
        assert not alive(pids[0]) and alive(pids[1])
        assert ps()[0]["state"] == "stopped"
        out = subprocess.run([*cli, "start", "a", "--run-dir", str(run_dir)], capture_output=True, text=True,
                             env=env)
        assert out.returncode == 0 and out.stdout.strip() == ps()[0]["address"]
        assert ps()[0]["state"] == "ready" and ps()[0]["restarts"] == 1
        out = subprocess.run([*cli, "stop", "--all", "--run-dir", str(run_dir)], capture_output=True, text=True,
                             env=env)
        assert out.returncode == 0
        assert up.wait(timeout=20) == 0
        assert not alive(pids[1])
        out = subprocess.run([*cli, "ps", "--run-dir", str(run_dir)], capture_output=True, text=True, env=env)
        assert out.returncode == 1 and "no manager running" in out.stderr
    finally:
        up.kill()
        up.wait()
