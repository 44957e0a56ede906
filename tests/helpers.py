"""Test helpers: start a real inferd server in-process or as a subprocess on a free port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from inferd.backends.base import Backend
from inferd.server.app import InferdServer
from inferd.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_settings(**overrides: Any) -> Settings:
    """Settings isolated from the caller's environment, bound to loopback, port 0."""
    base = Settings.load([], env={})
    return base.with_overrides(host="127.0.0.1", port=0, watch_parent=False, shutdown_grace=2.0, **overrides)


test_settings.__test__ = False  # a helper, not a test: pytest collects it where a test module imports it


@contextlib.asynccontextmanager
async def running_server(backend: Backend, **overrides: Any) -> AsyncIterator[InferdServer]:
    """Start ``backend`` behind a real grpc.aio server in this event loop; yields the server.

    The address is ``f"127.0.0.1:{server.port}"``.
    """
    server = InferdServer(test_settings(**overrides), backend)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def start_listening(cmd: list[str], env: dict[str, str], timeout: float = 60.0) -> subprocess.Popen:
    """Start a server process and return once it printed its "listening on" line.

    stdout is read line by line until that line. stderr goes to an unlinked temporary file,
    not a pipe: a chatty server (llama.cpp logs to stderr) would block on a full pipe that
    nobody drains; the file is read back when the server fails to start. The process is
    killed if it exits or stays silent past ``timeout``.
    """
    errors = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, env=env, text=True)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    try:
        while True:
            line = proc.stdout.readline()
            if "listening on" in line:
                return proc
            if not line and proc.poll() is not None:
                errors.seek(0)
                raise RuntimeError(f"server exited {proc.returncode}: {errors.read()}")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        raise


def inferd_env(**extra: str) -> dict[str, str]:
    """Environment for an ``inferd serve`` child of the tests/benches (no parent watch)."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}", "INFERD_WATCH_PARENT": "false", **extra}


@contextlib.contextmanager
def spawned_server(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run ``inferd serve ARGS`` as a subprocess on a free port; yield (process, address).

    Waits for the "listening on" line, so the port is bound when this yields.
    """
    port = free_port()
    proc = start_listening(
        [sys.executable, "-m", "inferd.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        inferd_env(**(env or {})),
        timeout,
    )
    try:
        yield proc, f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
