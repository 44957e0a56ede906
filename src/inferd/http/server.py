"""Run the ASGI app with uvicorn inside an existing asyncio loop.

The socket is bound here, before uvicorn starts, so port 0 picks a free port and the
caller learns it at once (``inferd: http on HOST:PORT``), and a port in use fails
with a clear error instead of a log line from a background task.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import uvicorn


class HttpServer:
    def __init__(self, app: Any, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"http: cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        # Signals belong to the host (``inferd up`` stops the front, then the backends): uvicorn
        # must not swap in its own handlers while it serves.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 10)
        self._server = None


async def serve_manager(manager: Any, address: str, api_keys: tuple[str, ...] = ()) -> HttpServer:
    """Start the OpenAI front for an ``AsyncModelManager`` running in this loop (``inferd up --http``).

    ``/metrics`` carries the front's request metrics and the supervisor's per-model state.
    """
    from inferd.http.app import create_app
    from inferd.http.source import ManagerSource
    from inferd.observability.metrics import Metrics
    from inferd.observability.supervisor_collector import SupervisorCollector

    host, _, port = address.rpartition(":")
    metrics = Metrics()
    metrics.registry.register(SupervisorCollector(manager))
    server = HttpServer(create_app(ManagerSource(manager), api_keys, metrics), host or "127.0.0.1", int(port))
    await server.start()
    return server
