"""Deploy the models of a ``models.yaml`` as Ray Serve applications, and tear them down.

One Ray Serve *application* per model, named like the model: Ray's gRPC proxy picks the
application from the ``application`` request metadata (``inferd call --metadata
application=NAME``); with one model deployed, no metadata is needed. Each application
has one deployment of ``ModelReplica`` with the replicas/resources of the entry's
``ray:`` block (``inferd.scale.config``).

Ray is told never to reach the internet: usage stats off (``RAY_USAGE_STATS_ENABLED=0``,
set before Ray is imported) and no dashboard.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from inferd.scale.config import scale_spec
from inferd.scale.replica import GRPC_SERVICER_FUNCTIONS, ModelReplica
from inferd.supervisor.config import ConfigError, SupervisorConfig

log = logging.getLogger("inferd.scale")

DEFAULT_GRPC_PORT = 9000
DEFAULT_HTTP_PORT = 8000
#: The application name of the OpenAI-compatible HTTP front (``deploy(openai=True)``).
OPENAI_APP = "openai"


class RayMissing(RuntimeError):
    """``ray[serve]`` is not installed: the message says how to get it."""


def import_ray() -> tuple[Any, Any]:
    """Import ray and ray.serve with usage stats off (they would phone home otherwise)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise RayMissing(f"Ray Serve is not installed ({exc}); pip install 'inferd[ray]'") from None
    return ray, serve


@dataclass(frozen=True)
class Cluster:
    """Where the deployed models answer."""

    grpc_address: str
    http_address: str
    applications: tuple[str, ...]
    ray_address: str  # the GCS address: `inferd ray shutdown --address` / `ray start --address`


def connect(address: str | None = None, num_cpus: float | None = None, temp_dir: str | None = None) -> None:
    """Join the Ray cluster at ``address`` ("auto": the local one), or start a single-node one."""
    ray, _ = import_ray()
    if ray.is_initialized():
        return
    _token_auth_for(address)
    kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                          "log_to_driver": False}
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus, _temp_dir=temp_dir, **kw)


def _token_auth_for(address: str | None) -> None:
    """Use the local Ray token (``~/.ray/auth_token``) for an explicit address too.

    Ray >= 2.5x starts local clusters with token auth and finds the token on its own only for
    ``address="auto"``; joining by GCS address (``inferd ray shutdown --address HOST:PORT``)
    would be refused. An explicit ``RAY_AUTH_MODE`` is left alone.
    """
    if not address or address == "auto" or "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


def deploy(config: SupervisorConfig, *, address: str | None = None, grpc_port: int = DEFAULT_GRPC_PORT,
           http_port: int = DEFAULT_HTTP_PORT, http_host: str = "127.0.0.1", num_cpus: float | None = None,
           request_timeout_s: float | None = None, temp_dir: str | None = None,
           openai: bool = False, api_keys: tuple[str, ...] = ()) -> Cluster:
    """Start (or join) Ray, start Serve's proxies and deploy every model; returns once all are ready.

    Every ``ray:`` block is validated before Ray starts, so a typo costs no cluster start.
    ``openai``: also deploy the OpenAI-compatible HTTP front (``inferd.scale.http_front``) on
    Serve's HTTP proxy; it is one more application, so gRPC calls must then name theirs.
    """
    specs = [(spec, scale_spec(spec)) for spec in config.models]
    if not specs:
        raise ConfigError("the models file has no models to deploy")
    if openai and any(spec.name == OPENAI_APP for spec, _ in specs):
        raise ConfigError(f"model name {OPENAI_APP!r} is taken by the HTTP front (--openai): rename the model")
    ray, serve = import_ray()
    from ray.serve.config import gRPCOptions

    connect(address, num_cpus, temp_dir)
    grpc_options = gRPCOptions(port=grpc_port, grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS),
                               request_timeout_s=request_timeout_s)
    serve.start(http_options={"host": http_host, "port": http_port}, grpc_options=grpc_options)
    for spec, scale in specs:
        app = serve.deployment(ModelReplica).options(name=spec.name, **scale.deployment_options()).bind(
            spec.name, spec.backend, spec.model_options().SerializeToString(), dict(spec.env))
        # serve.run returns once the application's replicas have started (model loaded: the
        # first health check loads it) or raises with the replica's failure.
        serve.run(app, name=spec.name, route_prefix=f"/{spec.name}")
        log.info("deployed %s (%s)", spec.name, scale)
    if openai:
        from inferd.scale.http_front import HttpFront

        front = serve.deployment(serve.ingress()(HttpFront)).options(name=OPENAI_APP, ray_actor_options={"num_cpus": 0})
        serve.run(front.bind(f"127.0.0.1:{grpc_port}", {spec.name: spec.backend for spec, _ in specs}, api_keys),
                  name=OPENAI_APP, route_prefix="/")
    node_ip = ray.util.get_node_ip_address()
    return Cluster(grpc_address=f"{node_ip}:{grpc_port}", http_address=f"{http_host}:{http_port}",
                   applications=tuple(spec.name for spec, _ in specs),
                   ray_address=ray.get_runtime_context().gcs_address)


def shutdown(address: str | None = "auto") -> None:
    """Delete every Serve application and stop the proxies, then disconnect from Ray.

    A single-node Ray started by ``deploy`` ends with the ``inferd ray deploy`` process;
    a cluster started with ``ray start`` stays up (``ray stop`` stops it).
    """
    _token_auth_for(address)  # before Ray is imported: it reads RAY_AUTH_MODE once
    ray, serve = import_ray()
    connect(address)
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
