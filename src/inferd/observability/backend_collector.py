"""Scrape-time metrics of one backend, and the ``/metrics`` port of ``inferd serve``.

``BackendCollector`` reads, when Prometheus scrapes, whether a model is loaded and the
backend's own view through LocalAI's ``GetMetrics`` (llama-cpp reports the slots in use,
the slot count and the queue depth as JSON in ``prompt_json_for_slot``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from inferd.observability.metrics import Metrics


class BackendCollector(Collector):
    """Scrape-time gauges from the backend: model loaded, slots in use, queue depth."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def collect(self) -> Iterable[GaugeMetricFamily]:
        backend = self.runtime.backend
        model = backend.model_name if backend.loaded else ""
        loaded = GaugeMetricFamily("inferd_model_loaded", "1 while a model is loaded.", labels=["backend", "model"])
        loaded.add_metric([backend.name, model], 1.0 if backend.loaded else 0.0)
        yield loaded
        stats = self._slot_stats()
        if stats is not None:
            for name, key, text in (("inferd_slots_in_use", "active", "Sequences being generated now."),
                                    ("inferd_slots_total", "slots", "Parallel sequences the engine runs."),
                                    ("inferd_queue_depth", "waiting", "Requests waiting for a slot.")):
                g = GaugeMetricFamily(name, text, labels=["backend"])
                g.add_metric([backend.name], float(stats.get(key, 0) or 0))
                yield g

    def _slot_stats(self) -> dict[str, Any] | None:
        """LocalAI's GetMetrics, when the backend has it (llama-cpp reports active/waiting/slots)."""
        if not self.runtime._supported.get("GetMetrics") or not self.runtime.backend.loaded:
            return None
        from inferd.backends.context import CallContext
        from inferd.proto import backend_pb2 as pb

        try:
            reply = self.runtime.backend.get_metrics(pb.MetricsRequest(), CallContext("GetMetrics"))
            data = json.loads(reply.prompt_json_for_slot or "{}")
        except Exception:  # noqa: BLE001 - a scrape must not fail because the backend is mid-change
            return None
        return data if isinstance(data, dict) else None


class MetricsEndpoint:
    """``/metrics`` on its own HTTP port (prometheus-client's threaded server)."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self.server, self.thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.metrics = metrics
        self.host = host
        self.port = int(self.server.server_address[1])

    def observe_load(self, model: str, seconds: float) -> None:
        """A load that did not come as a LoadModel rpc (``inferd serve --model``'s start-up load)."""
        self.metrics.load_seconds.labels(model or "-").observe(seconds)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if isinstance(self.thread, threading.Thread):
            self.thread.join(timeout=5)


