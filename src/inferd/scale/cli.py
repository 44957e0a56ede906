"""``inferd ray deploy models.yaml`` / ``inferd ray shutdown``: the Ray Serve front door.

``deploy`` prints ``inferd: ray grpc on HOST:PORT`` once every model's replicas are up
(model loaded) and stays in the foreground; Ctrl-C/SIGTERM (or ``inferd ray shutdown``
from another shell, which deletes the applications) tears the deployments down, and a
single-node Ray that ``deploy`` started ends with it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from inferd.scale.app import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT

#: Seconds between checks that the applications still exist (``inferd ray shutdown``).
POLL_S = 2.0


def add_ray_commands(sub: Any) -> None:
    ray = sub.add_parser("ray", help="scale out: serve models.yaml as Ray Serve deployments (inferd[ray])")
    cmds = ray.add_subparsers(dest="ray_command", required=True)
    deploy = cmds.add_parser("deploy", help="deploy every model of models.yaml and stay in the foreground")
    deploy.add_argument("config", help="the supervisor's models.yaml (a 'ray:' block per model sets replicas)")
    deploy.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto': the one `ray start` runs here) [default: start a "
                             "single-node Ray]")
    deploy.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT,
                        help=f"Ray Serve gRPC proxy port [default {DEFAULT_GRPC_PORT}]")
    deploy.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                        help=f"Ray Serve HTTP proxy port [default {DEFAULT_HTTP_PORT}]")
    deploy.add_argument("--http-host", default="127.0.0.1", help="Ray Serve HTTP proxy host [127.0.0.1]")
    deploy.add_argument("--num-cpus", type=float, default=None,
                        help="CPUs a single-node Ray advertises (logical; default: the machine's)")
    deploy.add_argument("--request-timeout", type=float, default=None,
                        help="end-to-end bound of one call through the proxy, seconds [none]")
    deploy.add_argument("--openai", action="store_true",
                        help="also serve the OpenAI-compatible HTTP API on Ray's HTTP proxy (an application "
                             "named 'openai': gRPC calls must then send 'application' metadata)")
    deploy.add_argument("--temp-dir", default=None, help="Ray's session directory for a single-node Ray "
                        "[Ray's default /tmp/ray]")
    deploy.set_defaults(handler=_deploy)
    down = cmds.add_parser("shutdown", help="delete the deployed applications and stop Serve's proxies")
    down.add_argument("--address", default="auto", help="Ray cluster [auto: the local one]")
    down.set_defaults(handler=_shutdown)


def _deploy(args: argparse.Namespace) -> int:
    from inferd.scale.app import RayMissing, deploy, import_ray
    from inferd.supervisor.config import ConfigError, load_config

    try:
        config = load_config(args.config)
        for port, what in ((args.grpc_port, "--grpc-port"), (args.http_port, "--http-port")):
            if not 1 <= port <= 65535:
                raise ConfigError(f"{what}: must be 1-65535, got {port}")
        ray, serve = import_ray()
    except (ConfigError, RayMissing) as exc:
        print(f"inferd: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster = deploy(config, address=args.address, grpc_port=args.grpc_port, http_port=args.http_port,
                         http_host=args.http_host, num_cpus=args.num_cpus, request_timeout_s=args.request_timeout,
                         temp_dir=args.temp_dir, openai=args.openai, api_keys=_api_keys())
    except ConfigError as exc:
        print(f"inferd: {exc}", file=sys.stderr)
        _teardown(ray, serve)
        return 2
    except Exception as exc:  # noqa: BLE001 - a replica that cannot start: say why, clean up
        print(f"inferd: deploy failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        _teardown(ray, serve)
        return 1
    print(f"inferd: ray grpc on {cluster.grpc_address}", flush=True)
    print(f"inferd: ray cluster at {cluster.ray_address}", flush=True)
    if args.openai:
        print(f"inferd: openai http on {cluster.http_address}", flush=True)
    print(f"inferd: applications {', '.join(cluster.applications)} (gRPC metadata 'application' picks one)",
          flush=True)
    try:
        while not stop.wait(POLL_S):
            if not _still_deployed(serve):  # `inferd ray shutdown` deleted them
                break
    finally:
        _teardown(ray, serve)
    return 0


def _api_keys() -> tuple[str, ...]:
    """The HTTP front's key: GRPC_API_KEY, as ``inferd up --http`` reads it (none: open)."""
    import os

    key = os.environ.get("GRPC_API_KEY", "")
    return (key,) if key else ()


def _still_deployed(serve: Any) -> bool:
    """False once the applications are gone (``inferd ray shutdown`` also stops the controller)."""
    try:
        return bool(serve.status().applications)
    except Exception:  # noqa: BLE001 - no Serve controller any more: shut down from elsewhere
        return False


def _teardown(ray: Any, serve: Any) -> None:
    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()


def _shutdown(args: argparse.Namespace) -> int:
    from inferd.scale.app import RayMissing, shutdown

    try:
        shutdown(args.address)
    except RayMissing as exc:
        print(f"inferd: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"inferd: no Ray cluster to shut down: {exc}", file=sys.stderr)
        return 1
    print("inferd: ray serve applications deleted", flush=True)
    return 0
