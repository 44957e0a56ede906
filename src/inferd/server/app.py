"""Assemble and run the grpc.aio server: services, interceptors, limits, TLS, shutdown.

``InferdServer`` owns one backend runtime and one grpc.aio server. It registers:
``backend.Backend`` (the servicer), seed 003's ``entity.grpc.LLMService``, the standard
``grpc.health.v1`` service (overall "" SERVING while up; ``backend.Backend`` SERVING
only while a model is loaded) and, when enabled, server reflection under both the
v1alpha and v1 names (grpcurl still speaks v1alpha; ``server.reflection`` resolves
method symbols too). Every service parses its request bytes in the handler
(``server.decoding``): undecodable bytes are INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from inferd.backends.base import Backend
from inferd.backends.context import CallContext
from inferd.observability.grpc_host import observe_server
from inferd.proto import backend_pb2 as pb
from inferd.protocol import LLM_SERVICE_NAME, SERVICE_NAME
from inferd.runtime import BackendRuntime
from inferd.server.decoding import decoding_handlers
from inferd.server.inference_servicer import INFERENCE_SERVICE_NAME, inference_handlers
from inferd.server.interceptors import HEALTH_METHODS, AuthInterceptor
from inferd.server.reflection import reflection_handlers
from inferd.server.servicer import BackendServicer, LLMServicer
from inferd.settings import Settings, SettingsError

log = logging.getLogger("inferd.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_size),
        ("grpc.max_send_message_length", settings.max_message_size),
        # grpc enables SO_REUSEPORT by default: two servers could silently share a port.
        ("grpc.so_reuseport", 0),
    ]


class InferdServer:
    """One backend behind one grpc.aio server."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.runtime = BackendRuntime(backend, max_workers=settings.max_workers,
                                      drain_timeout=settings.drain_timeout, load_timeout=settings.load_timeout)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int = 0
        self._stopping = False
        self.metrics_endpoint: Any = None  # observability.grpc_host.MetricsEndpoint with --metrics-port

    async def start(self) -> int:
        """Bind and start; return the bound port (useful with port 0)."""
        s = self.settings
        # Metrics/access log first: it also counts the calls auth refuses. Off unless asked for.
        interceptors, self.metrics_endpoint = observe_server(s, self.runtime)
        if s.api_keys:
            open_methods = HEALTH_METHODS if s.health_open else ()
            interceptors.append(AuthInterceptor(s.api_keys, open_methods))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=server_options(s),
            maximum_concurrent_rpcs=s.max_concurrent_rpcs,
        )
        services = s.service_set
        if "backend" in services:
            server.add_generic_rpc_handlers((BackendServicer(self.runtime).generic_handler(),))
        if "llm" in services:
            server.add_generic_rpc_handlers((LLMServicer(self.runtime).generic_handler(),))
        if "inference" in services:  # seed 002's service; requests parsed in the handler (server.decoding)
            server.add_generic_rpc_handlers(inference_handlers(self.runtime))
        # The stock health servicer, with its requests parsed in the handler (server.decoding).
        server.add_generic_rpc_handlers(
            decoding_handlers(lambda target: health_pb2_grpc.add_HealthServicer_to_server(self.health, target))
        )
        if s.enable_reflection:
            server.add_generic_rpc_handlers(
                reflection_handlers((SERVICE_NAME, LLM_SERVICE_NAME, INFERENCE_SERVICE_NAME, health.SERVICE_NAME))
            )
        address = s.listen_address
        try:
            if s.use_tls:
                port = server.add_secure_port(address, self._credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise SettingsError(f"cannot listen on {address}: {exc} (port in use?)") from exc
        if port == 0:
            raise SettingsError(f"cannot listen on {address} (port in use or bad address)")
        self.port = port
        self.server = server
        await server.start()
        await self.health.set("", SERVING)
        await self._set_model_health(self.backend.loaded)
        self.runtime.add_model_listener(
            lambda loaded: asyncio.get_running_loop().create_task(self._set_model_health(loaded))
        )
        log.info("serving backend '%s' on %s (port %d)", self.backend.name, address, port)
        return port

    async def _set_model_health(self, loaded: bool) -> None:
        if self._stopping:
            return
        status = SERVING if loaded else NOT_SERVING
        for service in (SERVICE_NAME, LLM_SERVICE_NAME):
            await self.health.set(service, status)

    def _credentials(self) -> grpc.ServerCredentials:
        s = self.settings
        key = Path(s.key_file).read_bytes()
        cert = Path(s.cert_file).read_bytes()
        ca = Path(s.client_ca_file).read_bytes() if s.client_ca_file else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    async def load(self, options: pb.ModelOptions) -> pb.Result:
        """Load a model through the same path as the LoadModel rpc."""
        return await self.runtime.load_model(options, CallContext("LoadModel"))

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, give in-flight calls ``grace`` seconds, cancel the rest."""
        if self.server is None or self._stopping:
            return
        self._stopping = True
        grace = self.settings.shutdown_grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.runtime.shutdown()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM/SIGINT or the parent's death, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watcher = None
        if self.settings.watch_parent:
            watcher = loop.create_task(_watch_parent(stop))
        waiter = loop.create_task(self.wait())
        stopper = loop.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        log.info("shutting down (grace %.1fs)", self.settings.shutdown_grace)
        await self.stop()
        for task in (watcher, stopper, waiter):
            if task is not None:
                task.cancel()


async def _watch_parent(stop: asyncio.Event, interval: float = 1.0) -> None:
    """Set ``stop`` when the parent process dies (we get re-parented).

    A process started directly by init (ppid 1) has nothing to watch. Polling
    ``getppid`` is used instead of ``PR_SET_PDEATHSIG`` because the latter fires when
    the parent *thread* that forked us exits, which kills children of thread pools.
    """
    parent = os.getppid()
    if parent <= 1:
        return
    while not stop.is_set():
        await asyncio.sleep(interval)
        if os.getppid() != parent:
            log.warning("parent process %d died; shutting down", parent)
            stop.set()
            return
