"""Scrape-time metrics of the model manager: per-model state, restarts, watchdog actions, memory.

Read from the manager's in-memory bookkeeping when Prometheus scrapes (no Status calls,
so a scrape never waits on a busy backend). Served by the HTTP front's ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class SupervisorCollector(Collector):
    def __init__(self, manager: Any) -> None:
        self.manager = manager  # an AsyncModelManager

    def collect(self) -> Iterable[Any]:
        from inferd.supervisor.async_manager import STATES, group_rss

        m = self.manager
        state = GaugeMetricFamily("inferd_supervisor_model_state", "1 for the state each model is in.",
                                  labels=["model", "state"])
        restarts = CounterMetricFamily("inferd_supervisor_restarts", "Backend restarts after the first start.",
                                       labels=["model"])
        kills = CounterMetricFamily("inferd_supervisor_watchdog_kills", "Backends killed by the busy timeout.",
                                    labels=["model"])
        idle = CounterMetricFamily("inferd_supervisor_watchdog_idle_stops", "Backends stopped by the idle timeout.",
                                   labels=["model"])
        evictions = CounterMetricFamily("inferd_supervisor_evictions",
                                        "Backends stopped to make room (LRU, memory threshold, group switch).",
                                        labels=["model"])
        load = GaugeMetricFamily("inferd_supervisor_model_load_seconds", "Spawn-to-loaded time of the last start.",
                                 labels=["model"])
        rss = GaugeMetricFamily("inferd_supervisor_backend_resident_memory_bytes",
                                "RSS of a running backend and its descendants.", labels=["model"])
        for name in m.names:
            current = m.state(name)
            for s in (*STATES, "exited"):
                state.add_metric([name, s], 1.0 if s == current else 0.0)
            c = m.counters(name)
            restarts.add_metric([name], c.restarts)
            kills.add_metric([name], c.watchdog_kills)
            idle.add_metric([name], c.watchdog_stops)
            evictions.add_metric([name], c.evictions)
            load.add_metric([name], m.load_seconds(name))
            slot_proc = m._slot(name).proc
            if current == "ready" and slot_proc is not None and slot_proc.pid:
                value = group_rss(slot_proc.pid)
                if value is not None:
                    rss.add_metric([name], value)
        yield from (state, restarts, kills, idle, evictions, load, rss)
