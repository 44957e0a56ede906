"""How ``inferd ps`` / ``inferd stop`` reach the manager that ``inferd up`` runs.

``inferd up`` serves a tiny JSON-over-HTTP control endpoint on 127.0.0.1 (a free
port) and writes ``RUN_DIR/manager.json`` (mode 0600): its pid, the endpoint URL
and a random token. The CLI commands read that file and call the endpoint with the
token in ``X-Inferd-Token``. A file left by a dead manager is detected by its pid
and reported as such, never trusted.

Why an endpoint and not only a state file: busy/idle times and the backends'
``Status`` live in the manager's memory and change every second; a stop must be
done by the manager itself, or it would restart the backend on the next request.

Endpoints: ``GET /ps``; ``POST /start/NAME`` (start on demand, returns the
address); ``POST /stop/NAME``; ``POST /shutdown``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from inferd.supervisor.manager import ModelError, ModelManager

STATE_FILE = "manager.json"


class ControlError(RuntimeError):
    """No manager is reachable, or it refused the request."""


class ControlServer:
    """The manager's control endpoint (see the module docstring)."""

    def __init__(self, manager: ModelManager, run_dir: Path, config_path: str = "") -> None:
        self.manager = manager
        self.run_dir = run_dir
        self.config_path = config_path
        self.token = secrets.token_hex(16)
        self.shutdown_requested = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def start(self) -> str:
        existing = read_state(self.run_dir)
        if existing is not None and _pid_alive(int(existing.get("pid", 0))):
            raise ControlError(f"a manager (pid {existing['pid']}) already runs with run dir {self.run_dir}; "
                               "stop it (`inferd stop --all`) or use another --run-dir")
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet: the manager logs actions itself
                return

            def _reply(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                sent = self.headers.get("X-Inferd-Token", "")
                return hmac.compare_digest(sent.encode(), server.token.encode())

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if not self._authorized():
                    return self._reply(401, {"error": "bad or missing X-Inferd-Token"})
                if self.path == "/ps":
                    return self._reply(200, {"pid": os.getpid(), "models": server.manager.ps()})
                return self._reply(404, {"error": f"no such endpoint {self.path}"})

            def do_POST(self) -> None:  # noqa: N802
                if not self._authorized():
                    return self._reply(401, {"error": "bad or missing X-Inferd-Token"})
                parts = self.path.strip("/").split("/")
                try:
                    if parts == ["shutdown"]:
                        server.shutdown_requested.set()
                        return self._reply(200, {"ok": True})
                    if len(parts) == 2 and parts[0] == "stop":
                        stopped = server.manager.stop(parts[1], "stop requested by `inferd stop`")
                        return self._reply(200, {"ok": True, "stopped": stopped})
                    if len(parts) == 2 and parts[0] == "start":
                        return self._reply(200, {"ok": True, "address": server.manager.ensure(parts[1])})
                except KeyError as exc:
                    return self._reply(404, {"error": str(exc.args[0])})
                except ModelError as exc:
                    return self._reply(500, {"error": str(exc)})
                return self._reply(404, {"error": f"no such endpoint {self.path}"})

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="inferd-control", daemon=True)
        self._thread.start()
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = {"pid": os.getpid(), "url": url, "token": self.token, "config": self.config_path,
                 "started_at": time.time(), "log_dir": str(self.manager.log_dir)}
        tmp = self.state_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_path)
        return url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        state = read_state(self.run_dir)
        if state is not None and state.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                self.state_path.unlink()


def read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class ControlClient:
    """Talks to the manager found in ``run_dir`` (used by ``inferd ps`` / ``inferd stop``)."""

    def __init__(self, run_dir: Path, timeout: float = 30.0) -> None:
        state = read_state(run_dir)
        if state is None:
            raise ControlError(f"no manager running (no {run_dir / STATE_FILE}; start one with `inferd up`)")
        if not _pid_alive(int(state.get("pid", 0))):
            raise ControlError(f"no manager running: {run_dir / STATE_FILE} is left by pid {state.get('pid')}, "
                               "which has exited")
        self.url = str(state["url"])
        self.token = str(state["token"])
        self.pid = int(state["pid"])
        self.timeout = timeout

    def request(self, method: str, path: str) -> Any:
        req = urllib.request.Request(self.url + path, method=method, headers={"X-Inferd-Token": self.token},
                                     data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error", "")
            except ValueError:
                detail = exc.reason
            raise ControlError(f"manager refused {method} {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ControlError(f"manager pid {self.pid} is not answering at {self.url}: {exc}") from None

    def ps(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/ps")["models"])

    def stop(self, name: str) -> bool:
        return bool(self.request("POST", f"/stop/{name}")["stopped"])

    def start(self, name: str) -> str:
        return str(self.request("POST", f"/start/{name}")["address"])

    def shutdown(self) -> None:
        self.request("POST", "/shutdown")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
