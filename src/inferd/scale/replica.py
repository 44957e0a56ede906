"""One Ray Serve replica: one backend, one ``BackendRuntime``, the model loaded at start.

Ray Serve's gRPC proxy decodes a request with our generated stubs and calls the method of
the ingress deployment named like the rpc (``Predict``, ``PredictStream``, ``Generate``)
with the request message and a ``grpc_context``. Those methods are installed from the rpc
tables below, and each one runs the SAME handler the standalone server runs
(``BackendServicer``/``LLMServicer``: decoding, CallContext, runtime, the one status map),
through ``RayServicerContext``, an adapter giving the handlers the three things they use
of a grpc.aio context. So a call through Ray behaves as a call to ``inferd serve``, status
codes included; only LoadModel/Free differ (the deployment owns the model, see below).

Nothing here imports Ray at module import time except the context type the proxy passes,
so the class stays importable where Ray is absent (the CLI then says to install it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from types import SimpleNamespace
from typing import Any

import grpc

from inferd.backends.context import CallContext
from inferd.backends.registry import create_backend
from inferd.errors import FailedPrecondition, LoadError
from inferd.proto import backend_pb2 as pb
from inferd.protocol import LLM_RPCS, LLM_SERVICE_NAME, RPCS, SERVICE_NAME, Rpc
from inferd.runtime import BackendRuntime
from inferd.server.servicer import BackendServicer, LLMServicer
from inferd.server.status_map import to_status
from inferd.settings import Settings

log = logging.getLogger("inferd.scale")


class Aborted(Exception):
    """Raised by ``RayServicerContext.abort``: the status is already set on Ray's context."""


class RayServicerContext:
    """The part of ``grpc.aio.ServicerContext`` our handlers use, over Ray's gRPC context.

    ``abort`` sets the code and message on Ray's ``RayServegRPCContext`` and raises: Ray's
    replica then wraps the exception with that code, and its proxy answers with it (not
    INTERNAL). Ray does not forward the client's deadline, so ``time_remaining`` is None;
    the proxy's ``request_timeout_s`` bounds the call instead.
    """

    def __init__(self, ray_context: Any) -> None:
        self._ray = ray_context

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        if self._ray is None:
            return ()
        return tuple(self._ray.invocation_metadata() or ())

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        if self._ray is not None:
            self._ray.set_code(code)
            self._ray.set_details(details)
        raise Aborted(f"{code.name}: {details}")


def _handler(generic: grpc.GenericRpcHandler, service: str, method: str) -> Callable[..., Any]:
    """The behaviour function grpc would call for ``/service/method``."""
    handler = generic.service(SimpleNamespace(method=f"/{service}/{method}", invocation_metadata=()))
    if handler is None:
        raise LookupError(f"/{service}/{method} is not served")
    return handler.unary_stream or handler.unary_unary


def _same_model(requested: pb.ModelOptions, deployed: pb.ModelOptions) -> bool:
    """A LoadModel naming the deployed model (LocalAI sends one after start) is a no-op."""
    names = {n for n in (requested.Model, requested.ModelFile) if n}
    ours = {n for n in (deployed.Model, deployed.ModelFile, os.path.basename(deployed.ModelFile)) if n}
    return not names or bool(names & ours)


class ModelReplica:
    """The deployment class: built by Ray once per replica (``inferd.scale.app`` wraps it).

    ``backend`` and ``options`` come from the model's entry in models.yaml; ``env`` is
    applied over the replica's environment before the settings are read, as the
    supervisor does for a child process.
    """

    async def __init__(self, name: str, backend: str, options: bytes,
                       env: Mapping[str, str] | None = None) -> None:
        # Ray Serve awaits an async constructor before the replica takes requests or
        # health checks, so no call ever reaches a replica whose model is still loading.
        os.environ.update(env or {})
        self.name = name
        self.settings = Settings.load([], env={**os.environ, "INFERD_BACKEND": backend})
        self.options = pb.ModelOptions.FromString(options)
        self.runtime = BackendRuntime(create_backend(backend, settings=self.settings),
                                      max_workers=self.settings.max_workers,
                                      drain_timeout=self.settings.drain_timeout,
                                      load_timeout=self.settings.load_timeout)
        self._backend_handlers = BackendServicer(self.runtime).generic_handler()
        self._llm = LLMServicer(self.runtime)
        result = await self.runtime.load_model(self.options, CallContext("LoadModel"))
        if not result.success:
            # Ray marks the replica failed and retries it; the reason shows in `serve status`
            # and in the exception `inferd ray deploy` prints.
            self.runtime.shutdown()
            raise LoadError(f"model {self.name!r}: {result.message}")
        log.info("replica of %s (pid %d) loaded: %s", self.name, os.getpid(), result.message)

    async def check_health(self) -> None:
        """Ray's replica health check: the backend's own Health and a loaded model."""
        reply = await self.runtime.unary("Health", pb.HealthMessage(), CallContext("Health"))
        if reply.message != b"OK":
            raise RuntimeError(f"backend Health answered {reply.message!r}")
        if not self.runtime.backend.loaded:
            raise RuntimeError(f"model {self.name!r} is not loaded: {self.runtime.backend.state()}")

    # ---- LoadModel/Free: the deployment owns the model ---------------------------------
    async def _load_model(self, request: pb.ModelOptions, grpc_context: Any) -> pb.Result:
        if _same_model(request, self.options):
            return pb.Result(success=True, message=f"{self.name}: loaded by the deployment on every replica")
        return await self._refuse(grpc_context, "LoadModel", FailedPrecondition(
            f"LoadModel through Ray: this deployment serves {self.options.Model or self.options.ModelFile!r}; "
            "change models.yaml and run `inferd ray deploy` again to serve another model"))

    async def _free(self, request: pb.HealthMessage, grpc_context: Any) -> pb.Result:
        return await self._refuse(grpc_context, "Free", FailedPrecondition(
            "Free through Ray would unload one replica behind the router; scale the deployment "
            "(models.yaml) or run `inferd ray shutdown`"))

    @staticmethod
    async def _refuse(grpc_context: Any, rpc: str, exc: Exception) -> Any:
        code, message = to_status(exc, rpc)
        await RayServicerContext(grpc_context).abort(code, message)

    # ---- the bridge used by the generated rpc methods ------------------------------------
    async def _unary(self, service: str, rpc: Rpc, request: Any, grpc_context: Any) -> Any:
        fn = _handler(self._backend_handlers, service, rpc.name)
        return await fn(request.SerializeToString(), RayServicerContext(grpc_context))

    async def _stream(self, rpc: Rpc, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
        context = RayServicerContext(grpc_context)
        if rpc.name == "Generate":
            agen = self._llm.generate(request.SerializeToString(), context)
        else:
            agen = _handler(self._backend_handlers, SERVICE_NAME, rpc.name)(request.SerializeToString(), context)
        try:
            async for reply in agen:
                yield reply
        finally:
            await agen.aclose()

    def __del__(self) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.shutdown()


def _install(rpc: Rpc, service: str) -> None:
    if rpc.name == "LoadModel":
        async def load(self: ModelReplica, request: Any, grpc_context: Any = None) -> Any:
            return await self._load_model(request, grpc_context)
        method: Callable[..., Any] = load
    elif rpc.name == "Free":
        async def free(self: ModelReplica, request: Any, grpc_context: Any = None) -> Any:
            return await self._free(request, grpc_context)
        method = free
    elif rpc.streaming:
        async def stream(self: ModelReplica, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:
            async for reply in self._stream(rpc, request, grpc_context):
                yield reply
        method = stream
    else:
        async def unary(self: ModelReplica, request: Any, grpc_context: Any = None) -> Any:
            return await self._unary(service, rpc, request, grpc_context)
        method = unary
    method.__name__ = rpc.name
    method.__qualname__ = f"ModelReplica.{rpc.name}"
    method.__doc__ = f"``/{service}/{rpc.name}`` through Ray Serve's gRPC proxy."
    setattr(ModelReplica, rpc.name, method)


for _rpc in RPCS.values():
    _install(_rpc, SERVICE_NAME)
for _rpc in LLM_RPCS.values():
    _install(_rpc, LLM_SERVICE_NAME)

#: What Ray's gRPC proxy must register (``gRPCOptions.grpc_servicer_functions``).
GRPC_SERVICER_FUNCTIONS = (
    "inferd.proto.backend_pb2_grpc.add_BackendServicer_to_server",
    "inferd.proto.llm_pb2_grpc.add_LLMServiceServicer_to_server",
)
