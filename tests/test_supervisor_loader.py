"""LocalAI's remaining loader features and the asyncio manager, against real echo backends.

Pinned models are never evicted, a memory threshold evicts the least recently used
backend, members of a mutually exclusive group stop each other, starts run
concurrently on one loop, and the sync facade's clients share that loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from inferd.client import SyncClient, new_client
from inferd.supervisor import eviction
from inferd.supervisor.async_manager import AsyncModelManager, ModelError
from inferd.supervisor.config import ConfigError, SupervisorConfig, config_from_dict, parse_percent
from inferd.supervisor.manager import ModelManager
from tests.test_supervisor import alive, config, row, spec


# ---- the rules, directly ----------------------------------------------------------------
def test_eviction_rules() -> None:
    R = eviction.Running  # noqa: N806
    running = [R("a", 1.0, pinned=True), R("b", 2.0, busy=True), R("c", 3.0), R("d", 4.0)]
    assert eviction.lru_victims(running, "e", max_loaded=2) == ["c", "d"]  # a pinned, b busy
    assert eviction.lru_victims(running, "e", max_loaded=2, force=True) == ["b", "c", "d"]
    assert eviction.lru_victims(running, "e", max_loaded=0) == []
    assert eviction.memory_victim(running, 80.0, 90.0) is None
    assert eviction.memory_victim(running, 91.0, 90.0) == "c"
    assert eviction.memory_victim(running, 91.0, 90.0, keep="c") == "d"
    assert eviction.memory_victim([R("a", 1.0, pinned=True)], 99.0, 90.0) is None
    grouped = [R("x", 1.0, group="gpu"), R("y", 2.0, group="gpu"), R("z", 3.0)]
    assert [r.name for r in eviction.group_conflicts(grouped, "y", "gpu")] == ["x"]
    assert eviction.group_conflicts(grouped, "z", "") == []


def test_config_keys_for_the_loader(tmp_path: Path) -> None:
    cfg = config_from_dict({
        "memory_threshold": "90%", "memory_source": "process", "http": "127.0.0.1:0",
        "models": [{"name": "a", "backend": "x", "pinned": True, "group": "gpu"}],
    })
    assert cfg.memory_threshold == 90 and cfg.memory_source == "process" and cfg.http == "127.0.0.1:0"
    assert cfg.models[0].pinned and cfg.models[0].group == "gpu"
    assert parse_percent(0.95, "t") == 95.0 and parse_percent("off", "t") == 0.0
    for doc, message in (({"memory_threshold": 120}, "between 0 and 100"),
                         ({"memory_threshold": "lots"}, "percentage"),
                         ({"memory_source": "gpu"}, "memory_source"),
                         ({"http": "8080"}, "HOST:PORT")):
        with pytest.raises(ConfigError, match=message):
            config_from_dict(doc)


# ---- against real backends ----------------------------------------------------------------
def test_pinned_model_is_never_evicted(tmp_path: Path) -> None:
    with ModelManager(config(tmp_path, spec("a", pinned=True), spec("b"), spec("c"), max_loaded=1)) as m:
        m.client("a").predict(Prompt="x")
        m.client("b").predict(Prompt="y")  # over the limit: a is pinned, so nothing is evicted
        assert row(m, "a")["state"] == "ready" and row(m, "b")["state"] == "ready"
        m.client("c").predict(Prompt="z")  # b (not pinned) makes room; a stays
        assert row(m, "a")["state"] == "ready" and row(m, "a")["pinned"]
        assert row(m, "b")["state"] == "stopped" and "LRU eviction" in row(m, "b")["last_event"]
        assert row(m, "b")["evictions"] == 1


def test_exclusive_group_stops_the_other_member(tmp_path: Path) -> None:
    with ModelManager(config(tmp_path, spec("a", group="gpu"), spec("b", group="gpu"), spec("c"))) as m:
        m.client("a").predict(Prompt="x")
        m.client("c").predict(Prompt="x")
        pid_a = row(m, "a")["pid"]
        m.client("b").predict(Prompt="y")
        ra = row(m, "a")
        assert ra["state"] == "stopped" and "exclusive group 'gpu'" in ra["last_event"] and not alive(pid_a)
        assert row(m, "b")["state"] == "ready" and row(m, "c")["state"] == "ready"  # c is in no group
        assert m.model("a").predict(Prompt="back").message == b"back"
        assert row(m, "b")["state"] == "stopped"


def test_exclusive_group_refuses_to_stop_a_pinned_member(tmp_path: Path) -> None:
    with ModelManager(config(tmp_path, spec("a", group="g", pinned=True), spec("b", group="g"))) as m:
        m.ensure("a")
        with pytest.raises(ModelError, match="pinned"):
            m.ensure("b")
        assert row(m, "a")["state"] == "ready"


def test_memory_threshold_evicts_least_recently_used(tmp_path: Path) -> None:
    state = {"manager": None}

    def probe() -> float:  # pretend each running backend uses 40% of memory
        mgr = state["manager"]
        running = sum(1 for n in mgr.names if mgr.address(n)) if mgr else 0
        return 40.0 * running

    cfg = config(tmp_path, spec("a", pinned=True), spec("b"), spec("c"), memory_threshold=75.0,
                 memory_interval=0.1)
    with ModelManager(cfg, memory_probe=probe) as m:
        state["manager"] = m.inner
        m.client("a").predict(Prompt="1")
        m.client("b").predict(Prompt="2")  # 80% once b runs: the monitor evicts b (a is pinned)
        assert _wait(lambda: row(m, "b")["state"] == "stopped")
        assert "threshold 75%" in row(m, "b")["last_event"]
        m.client("c").predict(Prompt="3")
        assert _wait(lambda: row(m, "c")["state"] == "stopped")
        assert row(m, "a")["state"] == "ready"


async def test_async_manager_starts_models_concurrently_on_one_loop(tmp_path: Path) -> None:
    manager = AsyncModelManager(config(tmp_path, spec("a"), spec("b"), spec("c")))
    await manager.start()
    threads_before = threading.active_count()
    try:
        t0 = time.monotonic()
        await asyncio.gather(*(manager.ensure(n) for n in manager.names))
        both = time.monotonic() - t0
        clients = [await manager.client(n) for n in manager.names]
        assert [c is await manager.client(n) for c, n in zip(clients, manager.names, strict=True)] == [True] * 3
        replies = await asyncio.gather(*(c.predict(Prompt=f"p{i}") for i, c in enumerate(clients)))
        assert [r.message for r in replies] == [b"p0", b"p1", b"p2"]
        rows = await manager.ps()
        assert [r["backend_state"] for r in rows] == ["READY"] * 3
        # no thread per backend or per client: only asyncio.to_thread's shared workers (fork/exec,
        # process waits) may have appeared, bounded by the executor, not by the number of models
        assert threading.active_count() <= threads_before + 8
        print(f"three backends started together in {both:.2f}s")
    finally:
        await manager.close()
    assert all(manager.state(n) == "stopped" for n in manager.names)


def test_sync_clients_share_the_manager_loop(tmp_path: Path) -> None:
    with ModelManager(config(tmp_path, spec("a"), spec("b"))) as m:
        before = threading.active_count()
        a, b = m.client("a"), m.client("b")
        assert a._loop is b._loop is m._loop and a._thread is None
        assert a.predict(Prompt="q").message == b"q"
        assert threading.active_count() <= before + 2


def test_sync_client_close_never_raises_when_the_loop_is_slow() -> None:
    client = SyncClient(lambda: new_client("127.0.0.1:9"))
    client._loop.call_soon_threadsafe(time.sleep, 1.5)  # the loop thread is stuck for a while
    t0 = time.monotonic()
    client.close(timeout=0.2)  # returns, does not raise, even though the loop cannot stop in time
    assert time.monotonic() - t0 < 1.2
    client.close(timeout=0.2)  # and again


def test_facade_refuses_blocking_calls_from_its_own_loop(tmp_path: Path) -> None:
    with ModelManager(config(tmp_path)) as m:
        async def inside() -> None:
            m.ensure("a")

        with pytest.raises(RuntimeError, match="own loop"):
            asyncio.run_coroutine_threadsafe(inside(), m._loop).result(10)


def _wait(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_supervisor_config_defaults_keep_loader_features_off() -> None:
    cfg = SupervisorConfig()
    assert cfg.memory_threshold == 0 and cfg.http == ""
