"""The watchdog (LocalAI's ``pkg/model/watchdog.go``): busy and idle timeouts.

Clients made by the manager carry this object as their ``WatchdogHooks``: every
model call is ``mark(address)`` ... ``unmark(address)``. A thread wakes every
``interval`` seconds and

* kills a backend whose oldest in-flight call is older than ``busy_timeout``
  (a stuck generation: the only remedy is a new process, restarted on demand);
* stops a backend with no call in flight for longer than ``idle_timeout``.

Both are off unless set, as in LocalAI (``WithBusyCheck``/``WithIdleCheck`` default
false). The watchdog decides; the manager acts (``on_busy``/``on_idle`` callbacks),
and every action is logged with the model name and the reason.

The asyncio manager does not start the thread: it runs ``check`` from its own loop
task after gathering the Status probes in parallel (``observe_status``).

Calls that do not go through our clients (``inferd up`` hands out addresses) are
invisible to marks; with ``track_status`` the watchdog also polls each backend's
``Status`` (ungated: it answers during a generation) and treats a BUSY state it did
not mark as one call that started when first seen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("inferd.supervisor.watchdog")


@dataclass
class _Track:
    model: str
    starts: list[float] = field(default_factory=list)  # in-flight calls, LIFO like LocalAI's legacy Mark
    idle_since: float | None = None
    last_used: float = 0.0
    external_since: float | None = None  # BUSY seen via Status without a mark


class Watchdog:
    """Busy/idle bookkeeping per backend address, and the thread that enforces it."""

    def __init__(
        self,
        busy_timeout: float | None = None,
        idle_timeout: float | None = None,
        interval: float = 0.5,
        on_busy: Callable[[str, str], None] | None = None,
        on_idle: Callable[[str, str], None] | None = None,
        status_probe: Callable[[str], bool | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.busy_timeout = busy_timeout
        self.idle_timeout = idle_timeout
        self.interval = interval
        self.on_busy = on_busy
        self.on_idle = on_idle
        self.status_probe = status_probe  # address -> backend reports BUSY? (None: unknown)
        self.clock = clock
        self._lock = threading.Lock()
        self._tracks: dict[str, _Track] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- registration (the manager) ----------------------------------------------
    def add(self, address: str, model: str) -> None:
        """Start watching a ready backend; it counts as idle from now."""
        now = self.clock()
        with self._lock:
            self._tracks[address] = _Track(model, idle_since=now, last_used=now)

    def remove(self, address: str) -> None:
        with self._lock:
            self._tracks.pop(address, None)

    # ---- WatchdogHooks (the clients) --------------------------------------------------
    def mark(self, address: str) -> None:
        now = self.clock()
        with self._lock:
            t = self._tracks.get(address)
            if t is None:  # a client of a backend we no longer run
                return
            t.starts.append(now)
            t.idle_since = None
            t.last_used = now

    def unmark(self, address: str) -> None:
        now = self.clock()
        with self._lock:
            t = self._tracks.get(address)
            if t is None or not t.starts:
                return
            t.starts.pop()
            t.last_used = now
            if not t.starts and t.external_since is None:
                t.idle_since = now

    # ---- queries -------------------------------------------------------------------
    def busy_since(self, address: str) -> float | None:
        with self._lock:
            t = self._tracks.get(address)
            return _busy_since(t) if t else None

    def idle_since(self, address: str) -> float | None:
        with self._lock:
            t = self._tracks.get(address)
            return t.idle_since if t else None

    def in_flight(self, address: str) -> int:
        with self._lock:
            t = self._tracks.get(address)
            return len(t.starts) if t else 0

    def is_busy(self, address: str) -> bool:
        return self.busy_since(address) is not None

    # ---- the loop --------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.busy_timeout or self.idle_timeout)

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return  # LocalAI: "No checks enabled, stopping watchdog"
        log.info("watchdog: started (busy timeout %s, idle timeout %s, every %.2fs)",
                 _fmt(self.busy_timeout), _fmt(self.idle_timeout), self.interval)
        self._thread = threading.Thread(target=self._run, name="inferd-watchdog", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watchdog must outlive a bad tick
                log.exception("watchdog: check failed")

    def check(self) -> None:
        """One tick: probe external busyness, then enforce the timeouts."""
        if self.status_probe is not None:
            self._probe()
        now = self.clock()
        busy: list[tuple[str, str, str]] = []
        idle: list[tuple[str, str, str]] = []
        with self._lock:
            for address, t in list(self._tracks.items()):
                since = _busy_since(t)
                if self.busy_timeout and since is not None and now - since > self.busy_timeout:
                    reason = (f"busy on one call for {now - since:.1f}s > busy timeout "
                              f"{self.busy_timeout:g}s")
                    busy.append((address, t.model, reason))
                    del self._tracks[address]
                elif (self.idle_timeout and since is None and t.idle_since is not None
                      and now - t.idle_since > self.idle_timeout):
                    reason = f"idle for {now - t.idle_since:.1f}s > idle timeout {self.idle_timeout:g}s"
                    idle.append((address, t.model, reason))
                    del self._tracks[address]
        for address, model, reason in busy:
            log.warning("watchdog: killing model %s at %s: %s", model, address, reason)
            if self.on_busy is not None:
                self.on_busy(model, reason)
        for address, model, reason in idle:
            log.warning("watchdog: stopping model %s at %s: %s", model, address, reason)
            if self.on_idle is not None:
                self.on_idle(model, reason)

    def _probe(self) -> None:
        assert self.status_probe is not None
        for address in self.addresses():
            reported = self.status_probe(address)
            if reported is not None:
                self.observe_status(address, reported)

    def addresses(self) -> list[str]:
        with self._lock:
            return list(self._tracks)

    def observe_status(self, address: str, reported_busy: bool) -> None:
        """Fold one Status answer in: a BUSY we did not mark counts as a call started now."""
        now = self.clock()
        with self._lock:
            t = self._tracks.get(address)
            if t is None:
                return
            if reported_busy and not t.starts and t.external_since is None:
                t.external_since = now
                t.idle_since = None
                t.last_used = now
            elif not reported_busy and t.external_since is not None:
                t.external_since = None
                t.last_used = now
                if not t.starts:
                    t.idle_since = now


def _busy_since(t: _Track) -> float | None:
    candidates = [*t.starts, *([t.external_since] if t.external_since is not None else [])]
    return min(candidates) if candidates else None


def _fmt(v: float | None) -> str:
    return "off" if not v else f"{v:g}s"
