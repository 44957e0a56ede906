"""Supervisor subcommands of ``inferd``: ``up``, ``ps``, ``stop``.

    inferd up models.yaml            run the manager in the foreground (Ctrl-C stops all)
    inferd up models.yaml --http 127.0.0.1:8080   ... plus the OpenAI-compatible API
    inferd ps [--json]               the running manager's backends
    inferd start NAME                start a model now (if stopped), print its address
    inferd stop NAME | --all         stop one backend, or the manager and all its backends

``ps`` and ``stop`` find the manager through ``RUN_DIR/manager.json`` (see
``inferd.supervisor.control``); RUN_DIR is ``--run-dir``, else ``$INFERD_RUN_DIR``,
else ``$XDG_RUNTIME_DIR/inferd``, else ``/tmp/inferd-UID``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any


def add_supervisor_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``up``/``ps``/``stop`` on the ``inferd`` parser."""
    up = sub.add_parser("up", help="start the model manager for a models.yaml (foreground)")
    up.add_argument("config", help="models.yaml: the models, limits and watchdog timeouts")
    _run_dir_arg(up)
    up.add_argument("--max-loaded", type=int, default=None, help="override max_loaded (0: unlimited)")
    up.add_argument("--busy-timeout", default=None, help="override watchdog.busy_timeout ('5m', 300, off)")
    up.add_argument("--idle-timeout", default=None, help="override watchdog.idle_timeout ('15m', 900, off)")
    up.add_argument("--lazy", action="store_true", help="start no model now; each starts on first demand")
    up.add_argument("--no-track-external", action="store_true",
                    help="count only calls made through the manager as busy (default: poll Status too)")
    up.add_argument("--log-level", default="info", help="debug, info, warning, error")
    up.add_argument("--log-format", default="text", choices=("text", "json"),
                    help="text lines or one JSON object per line")
    up.add_argument("--http", default=None, metavar="HOST:PORT",
                    help="serve the OpenAI-compatible API there (port 0 picks one); overrides 'http:' in the file")
    up.add_argument("--metrics-port", type=int, default=None,
                    help="also serve the supervisor's Prometheus /metrics on this port (the HTTP front has its own)")
    up.add_argument("--api-key", default=None,
                    help="key(s) the HTTP API requires as 'Authorization: Bearer KEY', comma-separated "
                         "[env GRPC_API_KEY; default none]")
    up.set_defaults(handler=_up)

    ps = sub.add_parser("ps", help="list the backends of the running manager")
    _run_dir_arg(ps)
    ps.add_argument("--json", action="store_true", help="print JSON rows")
    ps.set_defaults(handler=_ps)

    start = sub.add_parser("start", help="start a model of the running manager now; print its address")
    start.add_argument("name", help="model name, as in models.yaml")
    _run_dir_arg(start)
    start.set_defaults(handler=_start)

    stop = sub.add_parser("stop", help="stop a backend of the running manager (or --all)")
    stop.add_argument("name", nargs="?", help="model name, as in models.yaml")
    stop.add_argument("--all", action="store_true", help="stop every backend and the manager")
    _run_dir_arg(stop)
    stop.set_defaults(handler=_stop)


def _run_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=None,
                   help="where manager.json and the backends' logs live [env INFERD_RUN_DIR]")


def _run_dir(args: argparse.Namespace, fallback: str = "") -> Path:
    from inferd.supervisor.config import default_run_dir

    if args.run_dir:
        return Path(args.run_dir)
    return Path(fallback) if fallback else default_run_dir()


def _up(args: argparse.Namespace) -> int:
    from inferd.observability.logs import configure_logging
    from inferd.supervisor.config import ConfigError, load_config, parse_duration

    configure_logging(args.log_level, args.log_format)
    try:
        cfg = load_config(args.config)
        over: dict[str, Any] = {"track_external_calls": not args.no_track_external}
        if args.max_loaded is not None:
            over["max_loaded"] = args.max_loaded
        if args.busy_timeout is not None:
            over["busy_timeout"] = parse_duration(args.busy_timeout, "--busy-timeout")
        if args.idle_timeout is not None:
            over["idle_timeout"] = parse_duration(args.idle_timeout, "--idle-timeout")
        if args.http is not None:
            over["http"] = args.http
        run_dir = _run_dir(args, cfg.run_dir)
        cfg = replace(cfg, run_dir=str(run_dir), **over)
        cfg.validate()
    except ConfigError as exc:
        print(f"inferd up: {exc}", file=sys.stderr)
        return 2
    key = args.api_key if args.api_key is not None else os.environ.get("GRPC_API_KEY", "")
    keys = tuple(k.strip() for k in key.split(",") if k.strip())
    try:
        return asyncio.run(_run_up(cfg, run_dir, str(Path(args.config).resolve()), args.lazy, keys,
                                   args.metrics_port))
    except KeyboardInterrupt:
        return 130


async def _run_up(cfg: Any, run_dir: Path, config_path: str, lazy: bool, api_keys: tuple[str, ...],
                  metrics_port: int | None = None) -> int:
    """The manager, its control endpoint and (with ``http``) the OpenAI front, in one event loop."""
    from inferd.supervisor.control import ControlError, ControlServer
    from inferd.supervisor.manager import AsyncModelManager, ModelError, ModelManager

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    manager = AsyncModelManager(cfg)
    await manager.start()
    control = ControlServer(ModelManager.attach(manager, loop), run_dir, config_path)
    front = metrics = None
    try:
        try:
            url = control.start()
        except ControlError as exc:
            print(f"inferd up: {exc}", file=sys.stderr)
            return 1
        print(f"inferd up: manager pid {os.getpid()} control {url} (run dir {run_dir})", flush=True)
        if cfg.http:
            from inferd.http.server import serve_manager

            try:
                front = await serve_manager(manager, cfg.http, api_keys)
            except OSError as exc:
                print(f"inferd up: {exc}", file=sys.stderr)
                return 1
            print(f"inferd: http on {front.host}:{front.port}", flush=True)
        if metrics_port is not None:
            from inferd.observability.backend_collector import MetricsEndpoint
            from inferd.observability.metrics import Metrics
            from inferd.observability.supervisor_collector import SupervisorCollector

            registry = Metrics()
            registry.registry.register(SupervisorCollector(manager))
            try:
                metrics = MetricsEndpoint(registry, "127.0.0.1", metrics_port)
            except OSError as exc:
                print(f"inferd up: --metrics-port: {exc}", file=sys.stderr)
                return 1
            print(f"inferd: metrics on {metrics.host}:{metrics.port}", flush=True)
        if not lazy:
            limit = cfg.max_loaded or len(cfg.models)
            for spec in cfg.models[:limit]:
                if stop.is_set():
                    break
                try:
                    address = await manager.ensure(spec.name)
                    print(f"inferd up: {spec.name} ready at {address}", flush=True)
                except ModelError as exc:
                    print(f"inferd up: {spec.name} failed: {exc}", file=sys.stderr, flush=True)
        while not stop.is_set() and not control.shutdown_requested.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        return 0
    finally:
        if front is not None:
            await front.stop()
        if metrics is not None:
            metrics.close()
        await asyncio.to_thread(control.stop)
        await manager.close()


def _ps(args: argparse.Namespace) -> int:
    from inferd.supervisor.control import ControlClient, ControlError

    try:
        rows = ControlClient(_run_dir(args)).ps()
    except ControlError as exc:
        print(f"inferd ps: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_ps(rows))
    return 0


def format_ps(rows: list[dict[str, Any]]) -> str:
    """The ``inferd ps`` table."""
    head = ("NAME", "BACKEND", "STATE", "PID", "ADDRESS", "MEMORY", "BUSY", "IDLE", "RESTARTS", "LAST EVENT")
    table = [head]
    for r in rows:
        state = r["state"] + (f"/{r['backend_state'].lower()}" if r.get("backend_state") else "")
        table.append((
            r["name"], r["backend"], state, str(r["pid"] or "-"), r["address"] or "-",
            _human(r["rss_bytes"]) if r.get("rss_bytes") else "-",
            _secs(r.get("busy_seconds")), _secs(r.get("idle_seconds")), str(r["restarts"]),
            (r.get("last_error") or r.get("last_event") or "")[:60],
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)


def _start(args: argparse.Namespace) -> int:
    from inferd.supervisor.control import ControlClient, ControlError

    try:
        address = ControlClient(_run_dir(args), timeout=900).start(args.name)
    except ControlError as exc:
        print(f"inferd start: {exc}", file=sys.stderr)
        return 1
    print(address)
    return 0


def _stop(args: argparse.Namespace) -> int:
    from inferd.supervisor.control import ControlClient, ControlError

    if not args.all and not args.name:
        print("inferd stop: give a model NAME or --all", file=sys.stderr)
        return 2
    try:
        client = ControlClient(_run_dir(args))
        if args.all:
            client.shutdown()
            print(f"inferd stop: manager pid {client.pid} is stopping all backends")
            return 0
        stopped = client.stop(args.name)
    except ControlError as exc:
        print(f"inferd stop: {exc}", file=sys.stderr)
        return 1
    print(f"inferd stop: {args.name} {'stopped' if stopped else 'was not running'}")
    return 0


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}s"


def _human(n: int) -> str:
    from inferd.cli import human_bytes  # late: inferd.cli imports this module

    return human_bytes(n)
