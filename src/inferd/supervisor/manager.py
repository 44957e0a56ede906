"""The model manager: one ``inferd serve`` child per model, started on demand.

``ModelManager.client(name)`` makes sure the model's backend runs (spawn on a free
loopback port, wait for Health, LoadModel) and returns a client for it; asking again
reuses the running backend. Beyond ``max_loaded`` running backends the least
recently used idle one is stopped (LocalAI's LRU limit). A backend that died (crash,
``kill -9``, watchdog kill) is restarted by the next request. The watchdog's busy
and idle timeouts act through ``kill``/``stop`` here.

Hold ``manager.model(name)`` (a proxy that goes through the manager on every call)
rather than a raw client when a backend may be restarted: a raw client keeps the
address of the process it was made for.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from inferd.client import ChannelOptions, Client, RpcError, SyncClient, new_client, new_sync_client
from inferd.proto import backend_pb2 as pb
from inferd.settings import TRUE_WORDS
from inferd.supervisor.config import ModelSpec, SupervisorConfig, default_run_dir
from inferd.supervisor.process import BackendProcess, SpawnError
from inferd.supervisor.watchdog import Watchdog

log = logging.getLogger("inferd.supervisor")

STOPPED, STARTING, READY, FAILED = "stopped", "starting", "ready", "failed"
# Children serve plaintext on loopback; a TLS setting inherited from our environment
# would make them unreachable by the manager's own clients.
_CHILD_ENV_DROP = ("GRPC_USE_TLS", "GRPC_CLIENT_CA_FILE", "INFERD_ADDR", "GRPC_PORT", "INFERD_HOST")


class ModelError(RuntimeError):
    """A model could not be started or loaded; the message says why (with the log tail)."""


@dataclass
class _Slot:
    spec: ModelSpec
    state: str = STOPPED
    proc: BackendProcess | None = None
    client: SyncClient | None = None  # handed out; carries the watchdog hooks
    control: SyncClient | None = None  # ours: Health/LoadModel/Status, never marked
    last_used: float = 0.0
    started: int = 0
    restarts: int = 0
    last_error: str = ""
    last_event: str = ""
    load_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelManager:
    """Owns the backend processes of the configured models (see the module docstring)."""

    def __init__(self, config: SupervisorConfig) -> None:
        config.validate()
        self.config = config
        self.run_dir = Path(config.run_dir) if config.run_dir else default_run_dir()
        self.log_dir = Path(config.log_dir) if config.log_dir else self.run_dir / "logs"
        self._slots = {s.name: _Slot(s) for s in config.models}
        self._lock = threading.Lock()
        self._closed = False
        self.watchdog = Watchdog(
            busy_timeout=config.busy_timeout,
            idle_timeout=config.idle_timeout,
            interval=config.watchdog_interval,
            on_busy=lambda name, reason: self.kill(name, f"watchdog: {reason}"),
            on_idle=lambda name, reason: self.stop(name, f"watchdog: {reason}"),
            status_probe=self._probe_busy if config.track_external_calls else None,
        )
        self.watchdog.start()
        # Children must not outlive us: stop them at interpreter exit. (A kill -9 of
        # this process is covered by the children's parent-death watch.)
        ref = weakref.ref(self)
        self._atexit = lambda: (m := ref()) is not None and m.close()
        atexit.register(self._atexit)

    # ---- public API ---------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def ensure(self, name: str) -> str:
        """Start ``name`` if it is not running (restart if it died); return its address."""
        slot = self._slot(name)
        with slot.lock:
            if self._closed:
                raise ModelError("the model manager is closed")
            if slot.state == READY and slot.proc is not None and slot.proc.alive():
                slot.last_used = time.monotonic()
                return slot.proc.address
            if slot.state == READY and slot.proc is not None:
                code = slot.proc.returncode()
                log.warning("model %s: backend pid %s exited unexpectedly (status %s); restarting",
                            name, slot.proc.pid, code)
                slot.last_event = f"exited with status {code}"
                self._teardown(slot, kill=True)
        self._make_room(name)
        with slot.lock:
            if slot.state == READY and slot.proc is not None and slot.proc.alive():
                return slot.proc.address  # started meanwhile by another caller
            self._start(slot)
            assert slot.proc is not None
            return slot.proc.address

    def client(self, name: str) -> SyncClient:
        """A blocking client for ``name``'s running backend (started on demand)."""
        slot = self._slot(name)
        for _ in range(3):  # it may be stopped (LRU, watchdog) between ensure() and here
            self.ensure(name)
            client = slot.client
            if client is not None:
                return client
        raise ModelError(f"model {name!r} keeps stopping right after it starts; see `inferd ps`")

    async def aclient(self, name: str) -> Client:
        """An async client (``inferd.client.new_client``) in the caller's event loop.

        The start runs on a thread so the loop keeps serving; the caller closes the client.
        """
        address = await asyncio.to_thread(self.ensure, name)
        spec = self._slot(name).spec
        return new_client(address, parallel=spec.parallel, watchdog=self.watchdog,
                          options=self._channel_options(spec))

    def model(self, name: str) -> ModelProxy:
        """A proxy with the client's methods that survives restarts of the backend."""
        self._slot(name)
        return ModelProxy(self, name)

    def address(self, name: str) -> str | None:
        slot = self._slot(name)
        return slot.proc.address if slot.state == READY and slot.proc and slot.proc.alive() else None

    def stop(self, name: str, reason: str = "stop requested") -> bool:
        """Stop ``name`` gracefully (SIGTERM, then SIGKILL after ``stop_grace``)."""
        return self._stop(name, reason, kill=False)

    def kill(self, name: str, reason: str) -> bool:
        """Kill ``name`` now (a stuck call); the next request restarts it."""
        return self._stop(name, reason, kill=True)

    def start_all(self, limit: int | None = None) -> dict[str, str]:
        """Start the first ``limit`` models (default: up to ``max_loaded``, else all)."""
        limit = limit if limit is not None else (self.config.max_loaded or len(self._slots))
        out = {}
        for name in self.names[:limit]:
            out[name] = self.ensure(name)
        return out

    def ps(self, status_timeout: float = 1.0) -> list[dict[str, Any]]:
        """One row per configured model: state, pid, address, memory, busy/idle time."""
        rows = []
        now = time.monotonic()
        for name, slot in self._slots.items():
            proc = slot.proc
            alive = proc is not None and proc.alive()
            state = slot.state
            if state == READY and not alive:
                state = "exited"
            row: dict[str, Any] = {
                "name": name,
                "backend": slot.spec.backend,
                "model": slot.spec.model,
                "state": state,
                "pid": proc.pid if alive and proc else None,
                "address": proc.address if alive and proc and proc.port else None,
                "rss_bytes": _group_rss(proc.pid) if alive and proc and proc.pid else None,
                "backend_state": None,
                "backend_memory": None,
                "in_flight": 0,
                "busy_seconds": None,
                "idle_seconds": None,
                "uptime_seconds": round(now - proc.started_at, 1) if alive and proc else None,
                "restarts": slot.restarts,
                "last_event": slot.last_event,
                "last_error": slot.last_error,
                "log": str(proc.log_path) if proc else None,
            }
            if state == READY and proc is not None:
                addr = proc.address
                busy, idle = self.watchdog.busy_since(addr), self.watchdog.idle_since(addr)
                row["in_flight"] = self.watchdog.in_flight(addr)
                row["busy_seconds"] = round(now - busy, 1) if busy is not None else None
                row["idle_seconds"] = round(now - idle, 1) if idle is not None else None
                st = self._status(slot, status_timeout)
                if st is not None:
                    row["backend_state"] = pb.StatusResponse.State.Name(st.state)
                    row["backend_memory"] = st.memory.total
            rows.append(row)
        return rows

    def close(self) -> None:
        """Stop every backend (in parallel) and the watchdog. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.watchdog.shutdown()
        threads = [threading.Thread(target=self._stop, args=(n, "manager closing", False), daemon=True)
                   for n in self._slots]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=self.config.stop_grace + 10)
        with contextlib.suppress(Exception):
            atexit.unregister(self._atexit)

    def __enter__(self) -> ModelManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ------------------------------------------------------------------
    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            known = ", ".join(self._slots) or "none"
            raise KeyError(f"unknown model {name!r}; configured: {known}")
        return slot

    def _child_env(self, spec: ModelSpec) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_DROP}
        env.update(spec.env)
        for k in _CHILD_ENV_DROP:
            env.pop(k, None)
        return env

    def _channel_options(self, spec: ModelSpec) -> ChannelOptions:
        env = {**os.environ, **spec.env}
        key = env.get("LOCALAI_GRPC_AUTH_TOKEN", "")
        if not key and env.get("GRPC_REQUIRE_API_KEY", "").strip().lower() in TRUE_WORDS:
            key = env.get("GRPC_API_KEY", "")
        return ChannelOptions(api_key=key)

    def _start(self, slot: _Slot) -> None:
        """Spawn, wait for Health, LoadModel. Called with ``slot.lock`` held."""
        spec, cfg = slot.spec, self.config
        slot.state, slot.last_error = STARTING, ""
        if slot.started:
            slot.restarts += 1
        slot.started += 1
        t0 = time.monotonic()
        port = spec.port
        log_path = self.log_dir / f"{spec.name}.log"
        env = self._child_env(spec)
        try:
            for attempt in range(cfg.bind_retries + 1):
                proc = BackendProcess(spec.name, spec.backend, log_path, port, env, cfg.child_shutdown_grace)
                slot.proc = proc
                proc.start()
                log.info("model %s: starting backend %s (pid %d, log %s)", spec.name, spec.backend,
                         proc.pid, log_path)
                try:
                    proc.wait_listening(cfg.health_timeout)
                    break
                except SpawnError as exc:
                    proc.kill()
                    if exc.bind_failure and attempt < cfg.bind_retries:
                        log.warning("model %s: port %d is in use; retrying on a free port", spec.name, port)
                        port = 0  # the child binds a kernel-chosen free port: no second collision
                        continue
                    raise
            assert slot.proc is not None
            proc = slot.proc
            opts = self._channel_options(spec)
            slot.control = new_sync_client(proc.address, parallel=True, enable_watchdog=False, options=opts)
            self._wait_health(slot, t0 + cfg.health_timeout)
            try:
                result = slot.control.load_model(spec.model_options(), timeout=cfg.load_timeout)
            except RpcError as exc:
                raise SpawnError(f"model {spec.name!r}: LoadModel failed: {exc.code.name}: {exc.details}",
                                 proc.log_tail()) from None
            if not result.success:
                raise SpawnError(f"model {spec.name!r}: LoadModel failed: {result.message}", proc.log_tail())
            slot.client = new_sync_client(proc.address, parallel=spec.parallel, watchdog=self.watchdog,
                                          options=opts)
        except Exception as exc:  # noqa: BLE001 - any start failure is reported with the log tail
            slot.last_error = str(exc).splitlines()[0]
            slot.last_event = "failed to start"
            self._teardown(slot, kill=True)
            slot.state = FAILED
            log.error("model %s: %s", spec.name, slot.last_error)
            raise ModelError(str(exc)) from None
        slot.load_seconds = time.monotonic() - t0
        slot.state = READY
        slot.last_used = time.monotonic()
        slot.last_event = "started"
        self.watchdog.add(proc.address, spec.name)
        log.info("model %s: ready at %s (pid %d) in %.2fs: %s", spec.name, proc.address, proc.pid,
                 slot.load_seconds, result.message)

    def _wait_health(self, slot: _Slot, deadline: float) -> None:
        assert slot.proc is not None and slot.control is not None
        while True:
            remaining = deadline - time.monotonic()
            if slot.control.health_check(timeout=max(0.2, min(1.0, remaining))):
                return
            if not slot.proc.alive():
                raise SpawnError(f"backend {slot.spec.name!r} exited with status {slot.proc.returncode()} "
                                 "before answering Health", slot.proc.log_tail())
            if time.monotonic() > deadline:
                raise SpawnError(f"backend {slot.spec.name!r} did not answer Health within "
                                 f"{self.config.health_timeout:g}s", slot.proc.log_tail())
            time.sleep(0.05)

    def _make_room(self, name: str) -> None:
        """LRU: stop least recently used backends so ``name`` fits under ``max_loaded``."""
        limit = self.config.max_loaded
        if limit <= 0:
            return
        with self._lock:
            running = [s for n, s in self._slots.items()
                       if n != name and s.state in (READY, STARTING)]
            excess = len(running) - limit + 1
            if excess <= 0:
                return
            running.sort(key=lambda s: s.last_used)
        evicted = 0
        for s in running:
            if evicted >= excess:
                break
            if s.state != READY or s.proc is None:
                continue
            busy = self.watchdog.is_busy(s.proc.address)
            if busy and not self.config.force_eviction_when_busy:
                log.warning("model %s: not evicted (busy with a call) to make room for %s", s.spec.name, name)
                continue
            reason = f"LRU eviction: max_loaded={limit} reached, making room for {name}"
            if self._stop(s.spec.name, reason, kill=busy, blocking=False):
                evicted += 1
        if evicted < excess:
            log.warning("LRU eviction incomplete for %s: evicted %d of %d (the others are busy)",
                        name, evicted, excess)

    def _stop(self, name: str, reason: str, kill: bool, blocking: bool = True) -> bool:
        slot = self._slot(name)
        if not slot.lock.acquire(blocking=blocking):
            return False  # someone is starting or stopping it right now
        try:
            if slot.proc is None or slot.state not in (READY, STARTING):
                return False
            verb = "killing" if kill else "stopping"
            log.warning("model %s: %s backend pid %s: %s", name, verb, slot.proc.pid, reason)
            slot.last_event = f"{'killed' if kill else 'stopped'}: {reason}"  # before: callers see it
            self._teardown(slot, kill=kill)
            return True
        finally:
            slot.lock.release()

    def _teardown(self, slot: _Slot, kill: bool) -> None:
        """Stop the process, forget its address, retire its clients. ``slot.lock`` held."""
        proc = slot.proc
        if proc is not None:
            if proc.port:
                self.watchdog.remove(proc.address)
            if kill:
                proc.kill()  # first: a stuck call then fails with UNAVAILABLE instead of hanging
            else:
                proc.stop(self.config.stop_grace)
        for c in (slot.client, slot.control):
            if c is not None:
                _retire(c)
        slot.client = slot.control = None
        slot.state = STOPPED

    def _status(self, slot: _Slot, timeout: float) -> pb.StatusResponse | None:
        control = slot.control
        if control is None:
            return None
        try:
            return control.status(timeout=timeout)
        except (RpcError, RuntimeError):
            return None

    def _settle(self, name: str, wait: float = 0.5) -> None:
        """After UNAVAILABLE: give a dying backend time to be reaped.

        A killed child closes its sockets a moment before it becomes waitable, so a
        call made right after the failure would still see it alive and fail again;
        waiting here makes the *next* call find it dead and restart it.
        """
        proc = self._slot(name).proc
        if proc is not None and proc.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=wait)

    def _probe_busy(self, address: str) -> bool | None:
        for slot in self._slots.values():
            if slot.proc is not None and slot.state == READY and slot.proc.address == address:
                st = self._status(slot, 1.0)
                return None if st is None else st.state == pb.StatusResponse.BUSY
        return None


class ModelProxy:
    """Calls ``manager.client(name).METHOD(...)``: each call finds the live backend."""

    def __init__(self, manager: ModelManager, name: str) -> None:
        self._manager = manager
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def __getattr__(self, attr: str) -> Callable[..., Any]:
        if attr.startswith("_"):
            raise AttributeError(attr)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return getattr(self._manager.client(self._name), attr)(*args, **kwargs)
            except RpcError as exc:
                if exc.code == grpc.StatusCode.UNAVAILABLE:
                    self._manager._settle(self._name)
                raise

        call.__name__ = attr
        return call


def _retire(client: SyncClient, wait: float = 30.0) -> None:
    """Close ``client`` once no call is in flight on it (closing under a caller would hang it)."""

    def run() -> None:
        deadline = time.monotonic() + wait
        while client.is_busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(Exception):
            client.close()

    threading.Thread(target=run, name="inferd-retire-client", daemon=True).start()


def _group_rss(pid: int) -> int | None:
    """Resident memory of the backend and its descendants (llama.cpp threads, helpers)."""
    try:
        import psutil

        p = psutil.Process(pid)
        total = p.memory_info().rss
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += c.memory_info().rss
        return total
    except Exception:  # noqa: BLE001 - memory is informative only
        return None
