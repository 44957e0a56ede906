"""The asyncio model manager: one ``inferd serve`` child per model, all driven from one loop.

``AsyncModelManager.client(name)`` makes sure the model's backend runs (spawn on a free
loopback port, wait for Health, LoadModel) and returns its async client; asking again
reuses the running backend and the same client. Every wait (the child's port line,
Health, LoadModel, a stop) is awaited, so one loop serves the HTTP front, the watchdog
and any number of model starts at once, with no thread per backend or per client.
The sync facade (``inferd.supervisor.manager.ModelManager``) runs this class on a
private loop thread for the CLI, scripts and tests.

Loader rules (LocalAI's): LRU eviction past ``max_loaded``; pinned models are never
evicted; a memory threshold evicts the least recently used backend while memory use
is past it; starting a member of a mutually exclusive group stops the other members.
A backend that died (crash, ``kill -9``, watchdog kill) is restarted by the next
request. The busy/idle watchdog runs as a task of the same loop, its Status probes
gathered in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from inferd.client import ChannelOptions, Client, RpcError, new_client
from inferd.proto import backend_pb2 as pb
from inferd.settings import TRUE_WORDS
from inferd.supervisor import eviction
from inferd.supervisor.config import ModelSpec, SupervisorConfig, default_run_dir
from inferd.supervisor.process import BackendProcess, SpawnError
from inferd.supervisor.watchdog import Watchdog

log = logging.getLogger("inferd.supervisor")

STOPPED, STARTING, READY, FAILED = "stopped", "starting", "ready", "failed"
STATES = (STOPPED, STARTING, READY, FAILED)
# Children serve plaintext on loopback; a TLS setting inherited from our environment
# would make them unreachable by the manager's own clients.
_CHILD_ENV_DROP = ("GRPC_USE_TLS", "GRPC_CLIENT_CA_FILE", "INFERD_ADDR", "GRPC_PORT", "INFERD_HOST",
                   "INFERD_METRICS_PORT")
GROUP_WAIT = 60.0  # seconds a group switch waits for a busy member's calls to finish


class ModelError(RuntimeError):
    """A model could not be started or loaded; the message says why (with the log tail)."""


@dataclass
class Counters:
    """What the supervisor did, for ``inferd ps`` and the metrics."""

    restarts: int = 0
    watchdog_kills: int = 0  # busy timeout
    watchdog_stops: int = 0  # idle timeout
    evictions: int = 0  # LRU, memory threshold, group switches


@dataclass
class _Slot:
    spec: ModelSpec
    state: str = STOPPED
    proc: BackendProcess | None = None
    client: Client | None = None  # handed out; carries the watchdog hooks
    control: Client | None = None  # ours: Health/LoadModel/Status, never marked
    last_used: float = 0.0
    started: int = 0
    counters: Counters = field(default_factory=Counters)
    last_error: str = ""
    last_event: str = ""
    load_seconds: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def running(self) -> bool:
        return self.state == READY and self.proc is not None and self.proc.alive()


class AsyncModelManager:
    """Owns the backend processes of the configured models (see the module docstring)."""

    def __init__(self, config: SupervisorConfig, memory_probe: Callable[[], float] | None = None) -> None:
        config.validate()
        self.config = config
        self.run_dir = Path(config.run_dir) if config.run_dir else default_run_dir()
        self.log_dir = Path(config.log_dir) if config.log_dir else self.run_dir / "logs"
        self._slots = {s.name: _Slot(s) for s in config.models}
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[None]] = []
        self.memory_probe = memory_probe or self._memory_percent
        self.watchdog = Watchdog(
            busy_timeout=config.busy_timeout,
            idle_timeout=config.idle_timeout,
            interval=config.watchdog_interval,
            on_busy=lambda name, reason: self._spawn_task(self._watchdog_act(name, reason, kill=True)),
            on_idle=lambda name, reason: self._spawn_task(self._watchdog_act(name, reason, kill=False)),
        )

    # ---- life cycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Start the watchdog and the memory monitor in the running loop (both only when enabled)."""
        loop = asyncio.get_running_loop()
        if self.watchdog.enabled:
            log.info("watchdog: started (busy timeout %s, idle timeout %s, every %.2fs)",
                     self.config.busy_timeout or "off", self.config.idle_timeout or "off",
                     self.config.watchdog_interval)
            self._background.append(loop.create_task(self._watchdog_loop()))
        if self.config.memory_threshold > 0:
            self._background.append(loop.create_task(self._memory_loop()))

    async def close(self) -> None:
        """Stop every backend (in parallel) and the background tasks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for t in self._background:
            t.cancel()
        for t in self._background:
            with contextlib.suppress(BaseException):
                await t
        await asyncio.gather(*(self._stop(n, "manager closing", kill=False) for n in self._slots),
                             return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- public API -------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def spec(self, name: str) -> ModelSpec:
        return self._slot(name).spec

    def address(self, name: str) -> str | None:
        slot = self._slot(name)
        return slot.proc.address if slot.running() and slot.proc is not None else None

    async def ensure(self, name: str) -> str:
        """Start ``name`` if it is not running (restart if it died); return its address."""
        slot = self._slot(name)
        async with slot.lock:
            if self._closed:
                raise ModelError("the model manager is closed")
            if slot.running():
                slot.last_used = time.monotonic()
                assert slot.proc is not None
                return slot.proc.address
            if slot.state == READY and slot.proc is not None:
                code = slot.proc.returncode()
                log.warning("model %s: backend pid %s exited unexpectedly (status %s); restarting",
                            name, slot.proc.pid, code)
                slot.last_event = f"exited with status {code}"
                await self._teardown(slot, kill=True)
        await self._make_room(name)
        async with slot.lock:
            if slot.running():
                assert slot.proc is not None
                return slot.proc.address  # started meanwhile by another caller
            if self._closed:
                raise ModelError("the model manager is closed")
            await self._start(slot)
            assert slot.proc is not None
            return slot.proc.address

    async def client(self, name: str) -> Client:
        """The async client of ``name``'s running backend (started on demand), in this loop."""
        slot = self._slot(name)
        for _ in range(3):  # it may be stopped (LRU, watchdog) between ensure() and here
            await self.ensure(name)
            if slot.client is not None:
                return slot.client
        raise ModelError(f"model {name!r} keeps stopping right after it starts; see `inferd ps`")

    async def stop(self, name: str, reason: str = "stop requested") -> bool:
        """Stop ``name`` gracefully (SIGTERM, then SIGKILL after ``stop_grace``)."""
        return await self._stop(name, reason, kill=False)

    async def kill(self, name: str, reason: str) -> bool:
        """Kill ``name`` now (a stuck call); the next request restarts it."""
        return await self._stop(name, reason, kill=True)

    async def start_all(self, limit: int | None = None) -> dict[str, str]:
        """Start the first ``limit`` models (default: up to ``max_loaded``, else all), one after another."""
        limit = limit if limit is not None else (self.config.max_loaded or len(self._slots))
        return {name: await self.ensure(name) for name in self.names[:limit]}

    def counters(self, name: str) -> Counters:
        return self._slot(name).counters

    def state(self, name: str) -> str:
        slot = self._slot(name)
        return "exited" if slot.state == READY and not slot.running() else slot.state

    def load_seconds(self, name: str) -> float:
        return self._slot(name).load_seconds

    def channel_options(self, name: str) -> ChannelOptions:
        spec = self._slot(name).spec
        env = {**os.environ, **spec.env}
        key = env.get("LOCALAI_GRPC_AUTH_TOKEN", "")
        if not key and env.get("GRPC_REQUIRE_API_KEY", "").strip().lower() in TRUE_WORDS:
            key = env.get("GRPC_API_KEY", "")
        return ChannelOptions(api_key=key)

    async def ps(self, status_timeout: float = 1.0) -> list[dict[str, Any]]:
        """One row per configured model; the backends' Status calls run in parallel."""
        statuses = await asyncio.gather(*(self._status(s, status_timeout) for s in self._slots.values()))
        return [self._row(slot, st) for slot, st in zip(self._slots.values(), statuses, strict=True)]

    # ---- internals ------------------------------------------------------------------------
    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            known = ", ".join(self._slots) or "none"
            raise KeyError(f"unknown model {name!r}; configured: {known}")
        return slot

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _row(self, slot: _Slot, st: pb.StatusResponse | None) -> dict[str, Any]:
        now = time.monotonic()
        proc = slot.proc
        alive = proc is not None and proc.alive()
        state = "exited" if slot.state == READY and not alive else slot.state
        row: dict[str, Any] = {
            "name": slot.spec.name,
            "backend": slot.spec.backend,
            "model": slot.spec.model,
            "state": state,
            "pinned": slot.spec.pinned,
            "group": slot.spec.group,
            "pid": proc.pid if alive and proc else None,
            "address": proc.address if alive and proc and proc.port else None,
            "rss_bytes": group_rss(proc.pid) if alive and proc and proc.pid else None,
            "backend_state": None,
            "backend_memory": None,
            "in_flight": 0,
            "busy_seconds": None,
            "idle_seconds": None,
            "uptime_seconds": round(now - proc.started_at, 1) if alive and proc else None,
            "restarts": slot.counters.restarts,
            "watchdog_kills": slot.counters.watchdog_kills,
            "evictions": slot.counters.evictions,
            "load_seconds": round(slot.load_seconds, 3),
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
            if st is not None:
                row["backend_state"] = pb.StatusResponse.State.Name(st.state)
                row["backend_memory"] = st.memory.total
        return row

    def _child_env(self, spec: ModelSpec) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_DROP}
        env.update(spec.env)
        for k in _CHILD_ENV_DROP:
            env.pop(k, None)
        return env

    async def _start(self, slot: _Slot) -> None:
        """Spawn, wait for Health, LoadModel. Called with ``slot.lock`` held."""
        spec, cfg = slot.spec, self.config
        slot.state, slot.last_error = STARTING, ""
        if slot.started:
            slot.counters.restarts += 1
        slot.started += 1
        t0 = time.monotonic()
        port = spec.port
        log_path = self.log_dir / f"{spec.name}.log"
        env = self._child_env(spec)
        try:
            for attempt in range(cfg.bind_retries + 1):
                proc = BackendProcess(spec.name, spec.backend, log_path, port, env, cfg.child_shutdown_grace)
                slot.proc = proc
                await asyncio.to_thread(proc.start)  # fork+exec of a large parent: off the loop
                log.info("model %s: starting backend %s (pid %d, log %s)", spec.name, spec.backend,
                         proc.pid, log_path)
                try:
                    await proc.wait_listening_async(cfg.health_timeout)
                    break
                except SpawnError as exc:
                    await asyncio.to_thread(proc.kill)
                    if exc.bind_failure and attempt < cfg.bind_retries:
                        log.warning("model %s: port %d is in use; retrying on a free port", spec.name, port)
                        port = 0  # the child binds a kernel-chosen free port: no second collision
                        continue
                    raise
            assert slot.proc is not None
            proc = slot.proc
            opts = self.channel_options(spec.name)
            slot.control = new_client(proc.address, parallel=True, enable_watchdog=False, options=opts)
            await self._wait_health(slot, t0 + cfg.health_timeout)
            try:
                result = await slot.control.load_model(spec.model_options(), timeout=cfg.load_timeout)
            except RpcError as exc:
                raise SpawnError(f"model {spec.name!r}: LoadModel failed: {exc.code.name}: {exc.details}",
                                 proc.log_tail()) from None
            if not result.success:
                raise SpawnError(f"model {spec.name!r}: LoadModel failed: {result.message}", proc.log_tail())
            slot.client = new_client(proc.address, parallel=spec.parallel, watchdog=self.watchdog, options=opts)
        except Exception as exc:  # noqa: BLE001 - any start failure is reported with the log tail
            slot.last_error = str(exc).splitlines()[0]
            slot.last_event = "failed to start"
            await self._teardown(slot, kill=True)
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

    async def _wait_health(self, slot: _Slot, deadline: float) -> None:
        assert slot.proc is not None and slot.control is not None
        while True:
            remaining = deadline - time.monotonic()
            if await slot.control.health_check(timeout=max(0.2, min(1.0, remaining))):
                return
            if not slot.proc.alive():
                raise SpawnError(f"backend {slot.spec.name!r} exited with status {slot.proc.returncode()} "
                                 "before answering Health", slot.proc.log_tail())
            if time.monotonic() > deadline:
                raise SpawnError(f"backend {slot.spec.name!r} did not answer Health within "
                                 f"{self.config.health_timeout:g}s", slot.proc.log_tail())
            await asyncio.sleep(0.05)

    def _running(self) -> list[eviction.Running]:
        out = []
        for s in self._slots.values():
            if s.state in (READY, STARTING) and s.proc is not None:
                busy = bool(s.proc.port) and self.watchdog.is_busy(s.proc.address)
                out.append(eviction.Running(s.spec.name, s.last_used, s.spec.pinned, busy, s.spec.group))
        return out

    async def _make_room(self, name: str) -> None:
        """Group switch, then LRU past ``max_loaded``, then memory pressure, before ``name`` starts."""
        cfg, spec = self.config, self._slot(name).spec
        await self._switch_group(name, spec.group)
        victims = eviction.lru_victims(self._running(), name, cfg.max_loaded, cfg.force_eviction_when_busy)
        for victim in victims:
            busy = self.watchdog.is_busy(self.address(victim) or "")
            reason = f"LRU eviction: max_loaded={cfg.max_loaded} reached, making room for {name}"
            await self._stop(victim, reason, kill=busy, blocking=False, count="evictions")
        excess = len([r for r in self._running() if r.name != name]) - cfg.max_loaded + 1
        if cfg.max_loaded > 0 and excess > 0:
            log.warning("LRU eviction incomplete for %s: %d over max_loaded=%d (the others are busy or pinned)",
                        name, excess, cfg.max_loaded)
        await self._relieve_memory(keep=name)

    async def _switch_group(self, name: str, group: str) -> None:
        """Stop the other running members of ``name``'s exclusive group (waiting out busy ones)."""
        for member in eviction.group_conflicts(self._running(), name, group):
            if member.pinned:
                raise ModelError(f"model {name!r} cannot start: {member.name!r} of its exclusive group "
                                 f"{group!r} is pinned and running; stop it first")
            address = self.address(member.name) or ""
            deadline = time.monotonic() + GROUP_WAIT
            while (not self.config.force_eviction_when_busy and self.watchdog.is_busy(address)
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.05)
            if self.watchdog.is_busy(address) and not self.config.force_eviction_when_busy:
                raise ModelError(f"model {name!r} cannot start: {member.name!r} of its exclusive group {group!r} "
                                 f"is still busy after {GROUP_WAIT:g}s")
            reason = f"exclusive group {group!r}: {name} is starting"
            await self._stop(member.name, reason, kill=self.watchdog.is_busy(address), count="evictions")

    async def _relieve_memory(self, keep: str = "") -> None:
        """While memory use is past the threshold, stop the least recently used evictable backend."""
        cfg = self.config
        if cfg.memory_threshold <= 0:
            return
        for _ in range(len(self._slots)):
            used = await asyncio.to_thread(self.memory_probe)
            victim = eviction.memory_victim(self._running(), used, cfg.memory_threshold,
                                            cfg.force_eviction_when_busy, keep)
            if victim is None:
                return
            reason = f"memory {used:.1f}% >= threshold {cfg.memory_threshold:g}% ({cfg.memory_source})"
            busy = self.watchdog.is_busy(self.address(victim) or "")
            if not await self._stop(victim, reason, kill=busy, blocking=False, count="evictions"):
                return

    def _memory_percent(self) -> float:
        """Used memory in percent: the machine's (``system``) or ours plus the backends' (``process``)."""
        vm = psutil.virtual_memory()
        if self.config.memory_source == "system":
            return float(vm.percent)
        total = group_rss(os.getpid()) or 0
        return 100.0 * total / vm.total

    async def _memory_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.memory_interval)
            try:
                await self._relieve_memory()
            except Exception:  # noqa: BLE001 - the monitor must outlive a bad tick
                log.exception("memory monitor: check failed")

    async def _watchdog_loop(self) -> None:
        wd = self.watchdog
        while True:
            await asyncio.sleep(wd.interval)
            try:
                if self.config.track_external_calls:
                    await self._probe_statuses()
                wd.check()  # calls back on_busy/on_idle, which schedule the stops on this loop
            except Exception:  # noqa: BLE001
                log.exception("watchdog: check failed")

    async def _probe_statuses(self) -> None:
        """Status of every watched backend, in parallel; BUSY we did not mark counts as busy."""
        slots = {s.proc.address: s for s in self._slots.values() if s.running() and s.proc is not None}
        addresses = [a for a in self.watchdog.addresses() if a in slots]
        answers = await asyncio.gather(*(self._status(slots[a], 1.0) for a in addresses))
        for address, st in zip(addresses, answers, strict=True):
            if st is not None:
                self.watchdog.observe_status(address, st.state == pb.StatusResponse.BUSY)

    async def _watchdog_act(self, name: str, reason: str, kill: bool) -> None:
        await self._stop(name, f"watchdog: {reason}", kill=kill, count="watchdog_kills" if kill else "watchdog_stops")

    async def _stop(self, name: str, reason: str, kill: bool, blocking: bool = True, count: str = "") -> bool:
        """Stop a running backend; ``count`` names the ``Counters`` field to bump (before the stop,
        so a caller whose call fails because of it already sees the count)."""
        slot = self._slot(name)
        if not blocking and slot.lock.locked():
            return False  # someone is starting or stopping it right now
        async with slot.lock:
            if slot.proc is None or slot.state not in (READY, STARTING):
                return False
            if count:
                setattr(slot.counters, count, getattr(slot.counters, count) + 1)
            verb = "killing" if kill else "stopping"
            log.warning("model %s: %s backend pid %s: %s", name, verb, slot.proc.pid, reason)
            slot.last_event = f"{'killed' if kill else 'stopped'}: {reason}"  # before: callers see it
            await self._teardown(slot, kill=kill)
            return True

    async def _teardown(self, slot: _Slot, kill: bool) -> None:
        """Stop the process, forget its address, retire its clients. ``slot.lock`` held."""
        proc = slot.proc
        if proc is not None:
            if proc.port:
                self.watchdog.remove(proc.address)
            if kill:
                await asyncio.to_thread(proc.kill)  # first: a stuck call then fails with UNAVAILABLE
            else:
                await asyncio.to_thread(proc.stop, self.config.stop_grace)
        for c in (slot.client, slot.control):
            if c is not None:
                self._spawn_task(_retire(c))
        slot.client = slot.control = None
        slot.state = STOPPED

    async def _status(self, slot: _Slot, timeout: float) -> pb.StatusResponse | None:
        control = slot.control
        if control is None or slot.state != READY:
            return None
        try:
            return await control.status(timeout=timeout)
        except (RpcError, RuntimeError):
            return None
        except asyncio.CancelledError:
            # The control client was closed under the probe (the watchdog killed or stopped the
            # backend meanwhile): no status for this row, unless this task itself is cancelled.
            task = asyncio.current_task()
            cancelling = getattr(task, "cancelling", None)
            if task is None or cancelling is None or cancelling():
                raise
            return None

    async def settle(self, name: str, wait: float = 0.5) -> None:
        """After UNAVAILABLE: give a dying backend time to be reaped.

        A killed child closes its sockets a moment before it becomes waitable, so a
        call made right after the failure would still see it alive and fail again;
        waiting here makes the *next* call find it dead and restart it.
        """
        proc = self._slot(name).proc
        deadline = time.monotonic() + wait
        while proc is not None and proc.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


async def _retire(client: Client, wait: float = 30.0) -> None:
    """Close ``client`` once no call is in flight on it (closing under a caller would hang it)."""
    deadline = time.monotonic() + wait
    while client.is_busy() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    with contextlib.suppress(Exception):
        await client.close()


def group_rss(pid: int) -> int | None:
    """Resident memory of a process and its descendants (llama.cpp threads, helpers)."""
    try:
        p = psutil.Process(pid)
        total = p.memory_info().rss
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += c.memory_info().rss
        return total
    except Exception:  # noqa: BLE001 - memory is informative only
        return None
