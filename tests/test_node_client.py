"""A Node client (@grpc/grpc-js + @grpc/proto-loader) calls Health and Status on inferd."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.helpers import ROOT, spawned_server

NODE_DIR = ROOT / "tests" / "node"


def _node_ready() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return "run `npm ci` in tests/node (make test does)"
    return None


@pytest.mark.skipif(_node_ready() is not None, reason=str(_node_ready()))
@pytest.mark.parametrize("token", ["", "node-token"])
def test_node_client_calls_health_and_status(token):
    env = {"LOCALAI_GRPC_AUTH_TOKEN": token} if token else {}
    with spawned_server("--backend", "tests.fixtures_backend:EchoBackend", "--model", "test-model", env=env) as (_p, addr):
        out = subprocess.run(
            ["node", str(NODE_DIR / "client.js"), addr, str(ROOT / "proto" / "backend.proto"), token],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        assert reply["health"] == "OK"
        assert reply["state"] == "READY"
        assert reply["memoryTotal"] > 0
        if token:  # and without the token the Node client is refused
            bad = subprocess.run(
                ["node", str(NODE_DIR / "client.js"), addr, str(ROOT / "proto" / "backend.proto"), "wrong"],
                capture_output=True, text=True, timeout=60,
            )
            assert bad.returncode == 1 and "16" in bad.stderr  # 16 = UNAUTHENTICATED
