"""Metrics (prometheus-client) and structured logs shared by the gRPC host and the HTTP front.

``metrics.Metrics`` holds one registry with the families both hosts fill; the gRPC host
fills it from ``grpc_host.ObservabilityInterceptor`` (registered once in
``server.app``), the HTTP front from its routes, the supervisor through
``collectors.SupervisorCollector``. ``logs.configure_logging`` switches every inferd
logger between text and JSON lines. See docs/observability.md.
"""
