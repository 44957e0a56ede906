"""Metrics and access logs for the gRPC host, as one server interceptor.

``ObservabilityInterceptor`` wraps every method handler of every service (Backend,
LLMService, Inference, health) so each finished call is counted by status code,
timed, logged with its correlation id, and — for generation replies — accounted in
tokens, time to first token and tokens/s. It is installed by ``server.app`` only when
``--metrics-port`` or ``--log-format json`` asks for it: an unobserved server pays
nothing per call.

prometheus-client (the ``http`` extra) is imported only when metrics are asked for.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from inferd.observability.logs import log_call

if TYPE_CHECKING:
    from inferd.observability.backend_collector import MetricsEndpoint
    from inferd.observability.metrics import Metrics

log = logging.getLogger("inferd.observability")

CORRELATION_KEYS = ("x-correlation-id", "x-request-id")
_QUIET = frozenset({"Health", "Check", "Watch", "ServerReflectionInfo"})  # counted, not logged


def _correlation_id(metadata: Iterable[tuple[str, Any]] | None, request: Any) -> str:
    for key, value in metadata or ():
        if key in CORRELATION_KEYS and isinstance(value, str) and value:
            return value
    cid = getattr(request, "CorrelationId", "")
    return cid if isinstance(cid, str) and cid else uuid.uuid4().hex


def _code_name(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc: no code() on aio contexts
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c.name
    if exc is None:
        return "OK"
    return "CANCELLED" if isinstance(exc, BaseException) and type(exc).__name__ == "CancelledError" else "UNKNOWN"


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Counts, times and logs every call; accounts tokens of generation replies."""

    def __init__(self, metrics: Metrics | None, model_name: Callable[[], str], access_log: bool = True) -> None:
        self.metrics = metrics
        self.model_name = model_name
        self.access_log = access_log

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        rpc = details.method.rsplit("/", 1)[-1]
        metadata = details.invocation_metadata
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, rpc, metadata),
                                                       handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream, rpc, metadata),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream, rpc, metadata),
                                                         handler.request_deserializer, handler.response_serializer)
        return handler  # stream-unary: none in our services

    # ---- per-call bookkeeping -----------------------------------------------------------
    def _begin(self, rpc: str) -> float:
        if self.metrics is not None:
            self.metrics.in_flight.labels("grpc", rpc).inc()
        return time.perf_counter()

    def _end(self, rpc: str, start: float, code: str, cid: str) -> None:
        elapsed = time.perf_counter() - start
        model = self.model_name()
        if self.metrics is not None:
            m = self.metrics
            m.in_flight.labels("grpc", rpc).dec()
            m.requests.labels("grpc", rpc, code).inc()
            m.latency.labels("grpc", rpc).observe(elapsed)
            if rpc == "LoadModel" and code == "OK":
                m.load_seconds.labels(model or "-").observe(elapsed)
        if self.access_log and rpc not in _QUIET:
            log_call("grpc", rpc, model, cid, elapsed, code)

    def _account(self, reply: Any) -> None:
        """Token counts of a finished generation (Predict's reply, a stream's last reply)."""
        if self.metrics is None or not hasattr(reply, "prompt_tokens"):
            return
        self.metrics.observe_generation("grpc", self.model_name() or "-", reply.prompt_tokens, reply.tokens,
                                        reply.timing_token_generation)

    def _unary(self, behavior: Any, rpc: str, metadata: Any) -> Any:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = self._begin(rpc)
            cid = _correlation_id(metadata, request)
            exc: BaseException | None = None
            try:
                reply = await behavior(request, context)
                if rpc == "Predict":
                    self._account(reply)
                return reply
            except BaseException as e:
                exc = e
                raise
            finally:
                self._end(rpc, start, _code_name(context, exc), cid)

        return wrapper

    def _stream(self, behavior: Any, rpc: str, metadata: Any) -> Any:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = self._begin(rpc)
            cid = _correlation_id(metadata, request)
            exc: BaseException | None = None
            last = None
            first = True
            try:
                async for reply in behavior(request, context):
                    if first and getattr(reply, "message", b"") and self.metrics is not None:
                        first = False
                        self.metrics.ttft.labels("grpc", self.model_name() or "-").observe(
                            time.perf_counter() - start)
                    last = reply
                    yield reply
                if last is not None and rpc == "PredictStream":
                    self._account(last)
            except BaseException as e:
                exc = e
                raise
            finally:
                self._end(rpc, start, _code_name(context, exc), cid)

        return wrapper


def observe_server(settings: Any, runtime: Any) -> tuple[list[grpc.aio.ServerInterceptor], MetricsEndpoint | None]:
    """What ``server.app`` registers: the interceptor (if metrics or JSON logs are on) and the endpoint."""
    port = getattr(settings, "metrics_port", 0)
    json_logs = getattr(settings, "log_format", "text") == "json"
    if not port and not json_logs:
        return [], None
    metrics = None
    endpoint = None
    if port:
        try:
            from inferd.observability.backend_collector import BackendCollector, MetricsEndpoint
            from inferd.observability.metrics import Metrics
        except ImportError as exc:
            from inferd.settings import SettingsError

            raise SettingsError(f"INFERD_METRICS_PORT needs prometheus-client (pip install 'inferd[http]'): "
                                f"{exc}") from None

        metrics = Metrics()
        metrics.registry.register(BackendCollector(runtime))
        host = settings.listen_address.rsplit(":", 1)[0] or "0.0.0.0"
        try:
            endpoint = MetricsEndpoint(metrics, host, port)
        except OSError as exc:
            from inferd.settings import SettingsError

            raise SettingsError(f"INFERD_METRICS_PORT: cannot listen on {host}:{port}: {exc.strerror}") from None
    backend = runtime.backend

    def model_name() -> str:
        return backend.model_name if backend.loaded else ""

    return [ObservabilityInterceptor(metrics, model_name, access_log=True)], endpoint
