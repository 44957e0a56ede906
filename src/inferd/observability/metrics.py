"""The metric families, in one registry per host (never prometheus-client's global one).

One registry per ``Metrics`` keeps two servers in one process (the tests, an HTTP front
beside its manager) from mixing their numbers, and lets ``/metrics`` expose exactly one
host. Names follow Prometheus conventions (``_total`` counters, ``_seconds``
histograms); ``front`` is ``grpc`` or ``http``; ``method`` is the rpc name or the route.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """The families both hosts fill, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        if process:  # process_resident_memory_bytes, cpu seconds, open fds
            ProcessCollector(registry=r)
        self.requests = Counter("inferd_requests", "Calls finished, by status code (gRPC code name or HTTP status).",
                                ["front", "method", "code"], registry=r)
        self.latency = Histogram("inferd_request_duration_seconds", "Call duration from arrival to last byte.",
                                 ["front", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("inferd_requests_in_flight", "Calls being served now.", ["front", "method"],
                               registry=r)
        self.generated_tokens = Counter("inferd_generated_tokens", "Tokens generated.", ["front", "model"],
                                        registry=r)
        self.prompt_tokens = Counter("inferd_prompt_tokens", "Prompt tokens processed.", ["front", "model"],
                                     registry=r)
        self.ttft = Histogram("inferd_time_to_first_token_seconds", "Time from request to the first generated text.",
                              ["front", "model"], buckets=TTFT_BUCKETS, registry=r)
        self.tokens_per_second = Gauge("inferd_generation_tokens_per_second",
                                       "Decode speed of the last finished generation.", ["front", "model"],
                                       registry=r)
        self.load_seconds = Histogram("inferd_model_load_seconds", "LoadModel duration.", ["model"],
                                      buckets=LOAD_BUCKETS, registry=r)

    def observe_generation(self, front: str, model: str, prompt_tokens: int, generated: int,
                           generation_ms: float) -> None:
        """Account one finished generation (a Predict reply or the last reply of a stream)."""
        if generated > 0:
            self.generated_tokens.labels(front, model).inc(generated)
        if prompt_tokens > 0:
            self.prompt_tokens.labels(front, model).inc(prompt_tokens)
        if generated > 0 and generation_ms > 0:
            self.tokens_per_second.labels(front, model).set(generated / (generation_ms / 1000.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
