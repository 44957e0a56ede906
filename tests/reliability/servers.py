"""Server processes for the reliability suite: one ``inferd serve`` child per backend.

The suite drives real processes, not in-process servers, because what it proves is that the
*process* survives hostile input and lifecycle races: a SIGABRT in llama.cpp would take pytest
down with an in-process server. A child can also run under resource limits (``RLIMIT_AS`` so an
absurd allocation fails instead of eating the shared machine, ``RLIMIT_FSIZE`` to simulate a
full disk), and its stderr is kept in a file so a crash is reported with its last lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from inferd.backends.registry import BACKENDS
from inferd.proto import backend_pb2 as pb
from tests.helpers import free_port, inferd_env

#: How each known backend is loaded for the suite (Threads 1: the machine's cores are shared).
#: A backend registered later gets ``ModelOptions(Threads=1)``: its packaged default model.
LOAD_OPTIONS: dict[str, pb.ModelOptions] = {
    "llama-cpp": pb.ModelOptions(ContextSize=1024, Threads=1, Options=["parallel:4"]),
    "sentence-embeddings": pb.ModelOptions(Threads=1),
    "local-store": pb.ModelOptions(Model="store://reliability"),
}

# Runs ``inferd.cli`` after applying resource limits given as JSON in argv[1].
_LAUNCH = (
    "import json, resource, runpy, sys\n"
    "for name, value in json.loads(sys.argv[1]).items():\n"
    "    resource.setrlimit(getattr(resource, name), (value, value))\n"
    "sys.argv = ['inferd'] + sys.argv[2:]\n"
    "runpy.run_module('inferd.cli', run_name='__main__', alter_sys=True)\n"
)


class BackendUnavailable(RuntimeError):
    """The backend's engine is not importable here (its extra is not installed)."""


def load_options(backend: str) -> pb.ModelOptions:
    options = pb.ModelOptions()
    options.CopyFrom(LOAD_OPTIONS.get(backend, pb.ModelOptions(Threads=1)))
    return options


def registered_backends() -> list[str]:
    """Every name in the registry, so backends added later are fuzzed without editing the suite."""
    return sorted(BACKENDS)


@dataclass
class ServerProc:
    """A running ``inferd serve`` child and the way to reach it."""

    backend: str
    proc: subprocess.Popen
    address: str
    stderr_path: str
    _channel: grpc.Channel | None = field(default=None, repr=False)
    #: The result of the suite's LoadModel when ``spawn_all(load=True)`` made it.
    loaded: pb.Result | None = None
    #: Credentials sent with every call of the suite (set when spawned with ``api_key``).
    metadata: tuple[tuple[str, str], ...] = ()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address, options=CLIENT_OPTIONS)
        return self._channel

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = Path(self.stderr_path).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def unary(self, rpc: str, request: object, timeout: float = 30.0, metadata: tuple | None = None) -> object:
        from inferd.protocol import RPCS

        info = RPCS[rpc]
        method = self.channel().unary_unary(
            info.path, info.request.SerializeToString, info.response.FromString)
        return method(request, timeout=timeout, metadata=self.metadata if metadata is None else metadata)

    def health(self, timeout: float = 5.0) -> bool:
        try:
            reply = self.unary("Health", pb.HealthMessage(), timeout=timeout)
        except grpc.RpcError:
            return False
        return getattr(reply, "message", b"") == b"OK"

    def load(self, options: pb.ModelOptions | None = None, timeout: float = 120.0) -> pb.Result:
        return self.unary("LoadModel", options or load_options(self.backend), timeout=timeout)  # type: ignore[return-value]

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def close(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; return the exit status."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.unlink(self.stderr_path)
        return self.proc.returncode


#: Client channel options: large receive limit (the fuzzer's replies may be big), no reuseport.
CLIENT_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", -1)]


def spawn(backend: str, *args: str, env: dict[str, str] | None = None, limits: dict[str, int] | None = None,
          timeout: float = 120.0, api_key: str | None = None) -> ServerProc:
    """Start ``inferd serve --backend BACKEND ARGS`` on a free loopback port, model NOT loaded.

    Returns once the server printed its "listening on" line. ``limits`` maps resource names
    (``RLIMIT_AS``...) to values applied in the child before inferd starts; with ``api_key``
    the server requires it and the suite's own calls send it. Raises
    ``BackendUnavailable`` when the backend cannot be imported here.
    """
    port = free_port()
    serve = ["serve", "--backend", backend, "--host", "127.0.0.1", "--port", str(port),
             "--load-on-start", "false", *args]
    if api_key:
        serve += ["--require-api-key", "true", "--api-key", api_key]
    cmd = [sys.executable, "-c", _LAUNCH, json.dumps(limits or {}), *serve]
    fd, stderr_path = tempfile.mkstemp(prefix=f"inferd-{backend}-", suffix=".log")
    with os.fdopen(fd, "w") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, env=inferd_env(**(env or {})),
                                text=True)
    server = ServerProc(backend, proc, f"127.0.0.1:{port}", stderr_path,
                        metadata=(("x-api-key", api_key),) if api_key else ())
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if "listening on" in line:
            break
        if not line and proc.poll() is not None:
            tail = server.stderr_tail()
            server.close()
            if "cannot be imported" in tail:
                raise BackendUnavailable(f"{backend}: {tail.splitlines()[-1] if tail else ''}")
            raise RuntimeError(f"inferd serve --backend {backend} exited {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            server.close(0)
            raise TimeoutError(f"inferd serve --backend {backend} did not start in {timeout}s")
    # Nobody reads stdout after the banner: drain it so a chatty server never blocks.
    import threading

    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return server


def spawn_all(backends: list[str], *args: str, load: bool = False,
              **kwargs: object) -> dict[str, ServerProc | Exception]:
    """``spawn`` every backend at once (start-up is mostly imports: overlapping them saves time).

    Each value is the server or the exception its start raised (``BackendUnavailable``...).
    With ``load``, each server also gets LoadModel with the suite's options; the result is
    kept in ``ServerProc.loaded``.
    """
    from concurrent.futures import ThreadPoolExecutor

    def start(name: str) -> ServerProc | Exception:
        try:
            server = spawn(name, *args, **kwargs)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - reported per backend by the caller
            return exc
        if load:
            try:
                server.loaded = server.load()
            except grpc.RpcError as exc:
                server.loaded = pb.Result(success=False, message=f"{exc.code().name}: {exc.details()}")
        return server

    with ThreadPoolExecutor(max_workers=max(1, len(backends))) as pool:
        return dict(zip(backends, pool.map(start, backends), strict=True))


@contextlib.contextmanager
def serving(backend: str, *args: str, load: bool = True, **kwargs: object) -> Iterator[ServerProc]:
    """``spawn`` plus LoadModel with the suite's options; closes the child on exit."""
    server = spawn(backend, *args, **kwargs)  # type: ignore[arg-type]
    try:
        if load:
            result = server.load()
            if not result.success:
                raise RuntimeError(f"{backend}: LoadModel failed: {result.message}")
        yield server
    finally:
        server.close()
