"""``inferd serve``: build the backend, start the server, load the start-up model, wait."""

from __future__ import annotations

import logging
import sys
import time

from google.protobuf import json_format

from inferd.backends.registry import create_backend
from inferd.errors import InvalidArgument
from inferd.proto import backend_pb2 as pb
from inferd.server.app import InferdServer
from inferd.settings import Settings, SettingsError

log = logging.getLogger("inferd.server")


def startup_options(settings: Settings) -> pb.ModelOptions:
    """ModelOptions for the start-up load: ``--model-options`` JSON plus ``--model``."""
    options = pb.ModelOptions()
    if settings.model_options:
        try:
            json_format.Parse(settings.model_options, options)
        except json_format.ParseError as exc:
            raise SettingsError(f"INFERD_MODEL_OPTIONS: not a valid ModelOptions JSON: {exc}") from None
    if settings.model:
        options.Model = settings.model
    return options


async def run_server(settings: Settings) -> int:
    try:
        backend = create_backend(settings.backend, settings=settings)
    except InvalidArgument as exc:
        raise SettingsError(f"INFERD_BACKEND: {exc.message}") from None
    options = startup_options(settings)
    server = InferdServer(settings, backend)
    port = await server.start()
    # One machine-readable line on stdout: supervisors read the bound port from it.
    print(f"inferd: listening on {settings.listen_address.rsplit(':', 1)[0]}:{port}", flush=True)
    if server.metrics_endpoint is not None:
        print(f"inferd: metrics on {server.metrics_endpoint.host}:{server.metrics_endpoint.port}", flush=True)
    if settings.load_on_start:
        # A load can take minutes: say what is loading, then how long it took (the log is on stderr).
        log.info("loading %s ...", options.ModelFile or options.Model or "the backend's default model")
        started = time.perf_counter()
        result = await server.load(options)
        took = time.perf_counter() - started
        if server.metrics_endpoint is not None and result.success:
            server.metrics_endpoint.observe_load(server.backend.model_name, took)
        if not result.success:
            print(f"inferd: failed to load the model after {took:.2f}s: {result.message}", file=sys.stderr,
                  flush=True)
            await server.stop(0)
            return 1
        log.info("model loaded in %.2fs: %s", took, result.message)
    await server.run_until_signalled()
    return 0
