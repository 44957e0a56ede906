"""One backend child process: spawn ``inferd serve``, learn its port, stop or kill it.

The child gets its own process group (``start_new_session``) so a stop reaches
anything it started, and ``INFERD_WATCH_PARENT=true`` so it exits by itself if
the manager dies without cleaning up (``kill -9``): no ``PR_SET_PDEATHSIG`` via
``preexec_fn``, which is unsafe in a threaded parent and fires when the spawning
*thread* exits rather than the process.

Its stdout and stderr go to a log file (never a pipe a busy manager could forget
to drain); the port is read from the server's one machine-readable line
``inferd: listening on HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

LISTENING = re.compile(rb"^inferd: listening on (\S+):(\d+)\s*$", re.M)
BIND_FAILURE = re.compile(rb"cannot listen on", re.I)


class SpawnError(RuntimeError):
    """The child did not come up; ``log_tail`` is the end of its output."""

    def __init__(self, message: str, log_tail: str = "", bind_failure: bool = False) -> None:
        full = f"{message}\n--- backend log (last lines) ---\n{log_tail}" if log_tail else message
        super().__init__(full)
        self.log_tail = log_tail
        self.bind_failure = bind_failure


class BackendProcess:
    """A spawned ``inferd serve`` child and its log."""

    def __init__(
        self,
        name: str,
        backend: str,
        log_path: Path,
        port: int = 0,
        env: Mapping[str, str] | None = None,
        shutdown_grace: float = 3.0,
    ) -> None:
        self.name = name
        self.backend = backend
        self.log_path = log_path
        self.requested_port = port
        self.port = 0
        self.host = "127.0.0.1"
        self.env = dict(env or {})
        self.shutdown_grace = shutdown_grace
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._log_offset = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "inferd.cli", "serve",
            "--backend", self.backend,
            "--host", self.host,
            "--port", str(self.requested_port),
            "--load-on-start", "false",
        ]

    def start(self) -> None:
        env = {**os.environ, **self.env}
        env["INFERD_WATCH_PARENT"] = "true"  # exit when the manager dies
        env["INFERD_LOAD_ON_START"] = "false"
        env.setdefault("INFERD_SHUTDOWN_GRACE", str(self.shutdown_grace))
        env.setdefault("PYTHONUNBUFFERED", "1")
        for key in ("INFERD_ADDR",):  # would override --host/--port
            env.pop(key, None)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- inferd supervisor: starting {self.name} ({' '.join(self.command())})\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self.popen = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: killpg reaches grandchildren
                close_fds=True,
            )
        self.started_at = time.monotonic()

    def poll_listening(self) -> int | None:
        """The bound port once the child printed it; None while it starts; SpawnError if it exited."""
        m = LISTENING.search(self._read_log())
        if m:
            self.port = int(m.group(2))
            return self.port
        code = self.returncode()
        if code is not None:
            out = self._read_log()
            raise SpawnError(
                f"backend {self.name!r} exited with status {code} before listening",
                self.log_tail(),
                bind_failure=bool(BIND_FAILURE.search(out)),
            )
        return None

    def wait_listening(self, timeout: float) -> int:
        """Block until the child printed its bound port; return it."""
        deadline = time.monotonic() + timeout
        while (port := self.poll_listening()) is None:
            if time.monotonic() > deadline:
                raise SpawnError(f"backend {self.name!r} did not report its port within {timeout:.0f}s",
                                 self.log_tail())
            time.sleep(0.02)
        return port

    async def wait_listening_async(self, timeout: float) -> int:
        """``wait_listening`` for an event loop: polls the log without blocking the loop."""
        deadline = time.monotonic() + timeout
        while (port := self.poll_listening()) is None:
            if time.monotonic() > deadline:
                raise SpawnError(f"backend {self.name!r} did not report its port within {timeout:.0f}s",
                                 self.log_tail())
            await asyncio.sleep(0.02)
        return port

    def _read_log(self) -> bytes:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read()
        except OSError:
            return b""

    def log_tail(self, lines: int = 30) -> str:
        text = self._read_log().decode("utf-8", "replace")
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])

    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen else -1

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def _signal_group(self, sig: int) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)  # pgid == pid: start_new_session made it a leader

    def kill(self) -> None:
        """SIGKILL the whole group now and reap the child."""
        if self.popen is None:
            return
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)

    def stop(self, grace: float) -> None:
        """SIGTERM (the server drains calls for its shutdown grace), SIGKILL after ``grace``."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # leftovers of the group, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
