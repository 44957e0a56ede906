"""Faults: a backend killed mid-stream, SIGTERM with streams in flight, a read-only or full store
directory, a model file truncated on disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from inferd.client import RpcError
from inferd.proto import backend_pb2 as pb
from inferd.protocol import RPCS
from inferd.supervisor.config import ModelSpec, SupervisorConfig
from inferd.supervisor.manager import ModelManager
from tests.helpers import ROOT
from tests.reliability.servers import ServerProc, spawn

ECHO = "tests.fixtures_backend:EchoBackend"
CLEAR_STORE_ERRORS = frozenset({"RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "UNAVAILABLE"})


def _stream(server: ServerProc, request: pb.PredictOptions, timeout: float = 30.0) -> grpc.Call:
    info = RPCS["PredictStream"]
    method = server.channel().unary_stream(info.path, info.request.SerializeToString, info.response.FromString)
    return method(request, timeout=timeout)


# ---- kill -9 under the supervisor ---------------------------------------------------------------
def test_backend_killed_mid_stream_is_restarted_for_the_next_call(tmp_path: Path) -> None:
    spec = ModelSpec("a", ECHO, model="test-model", env={"PYTHONPATH": str(ROOT)})
    cfg = SupervisorConfig(models=(spec,), run_dir=str(tmp_path / "run"), stop_grace=2.0, health_timeout=30.0)
    with ModelManager(cfg) as manager:
        model = manager.model("a")
        assert model.predict(Prompt="warm").message == b"warm"
        pid = next(r for r in manager.ps() if r["name"] == "a")["pid"]
        words = " ".join(f"w{i}" for i in range(400))
        got: list[bytes] = []
        with pytest.raises(RpcError) as err:
            for reply in model.predict_stream(Prompt=f"slow:0.02 {words}", timeout=30):
                got.append(reply.message)
                if len(got) == 5:
                    os.kill(pid, signal.SIGKILL)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
        assert 5 <= len(got) < 400
        assert model.predict(Prompt="after").message == b"after"  # served by a restarted backend
        row = next(r for r in manager.ps() if r["name"] == "a")
        assert row["pid"] != pid and row["state"] == "ready" and row["restarts"] == 1


# ---- SIGTERM with streams in flight -------------------------------------------------------------
def _drain(call: grpc.Call, out: list, errors: list) -> None:
    try:
        for reply in call:
            out.append(reply.message)
    except grpc.RpcError as exc:
        errors.append(exc.code())


def test_sigterm_lets_streams_in_flight_finish_within_the_grace_period() -> None:
    server = spawn(ECHO, "--shutdown-grace", "5")
    try:
        server.unary("LoadModel", pb.ModelOptions(Model="test-model"))
        words = " ".join(f"w{i}" for i in range(30))  # 30 x 50 ms: 1.5 s, inside the 5 s grace
        results = [([], []) for _ in range(4)]
        calls = [_stream(server, pb.PredictOptions(Prompt=f"slow:0.05 {words}")) for _ in results]
        threads = [threading.Thread(target=_drain, args=(c, *r)) for c, r in zip(calls, results, strict=True)]
        for t in threads:
            t.start()
        while not all(out for out, _ in results):
            time.sleep(0.01)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=10)
        assert server.proc.wait(timeout=10) == 0
        took = time.monotonic() - start
        for out, errors in results:
            assert not errors and len(out) == 30, (len(out), errors)
        assert took < 5.0, f"exit took {took:.1f}s with streams needing 1.5 s"
    finally:
        server.close()


def test_sigterm_cuts_streams_longer_than_the_grace_period() -> None:
    server = spawn(ECHO, "--shutdown-grace", "1")
    try:
        server.unary("LoadModel", pb.ModelOptions(Model="test-model"))
        words = " ".join(f"w{i}" for i in range(400))  # 400 x 50 ms = 20 s, far past the grace
        out: list[bytes] = []
        errors: list[grpc.StatusCode] = []
        t = threading.Thread(target=_drain, args=(_stream(server, pb.PredictOptions(Prompt=f"slow:0.05 {words}")),
                                                  out, errors))
        t.start()
        while not out:
            time.sleep(0.01)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=10) == 0
        took = time.monotonic() - start
        t.join(timeout=10)
        assert errors and len(out) < 400, (len(out), errors)
        assert took < 1.0 + 3.0, f"exit took {took:.1f}s with a 1 s grace"
    finally:
        server.close()


def test_sigterm_finishes_a_real_generation_in_flight() -> None:
    server = spawn("llama-cpp", "--shutdown-grace", "20")
    try:
        assert server.load().success
        out: list[bytes] = []
        errors: list[grpc.StatusCode] = []
        call = _stream(server, pb.PredictOptions(Prompt="Count", Tokens=96, IgnoreEOS=True, Temperature=0.0))
        t = threading.Thread(target=_drain, args=(call, out, errors))
        t.start()
        while not out and t.is_alive():
            time.sleep(0.005)
        assert t.is_alive(), "the generation ended before SIGTERM: nothing was in flight"
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=25) == 0
        t.join(timeout=5)
        assert not errors, errors
        assert call.code() == grpc.StatusCode.OK
    finally:
        server.close()


# ---- read-only and full store directories --------------------------------------------------------
@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` at ``path``; yields False (and a plain directory) if not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount(path: Path, mode: str) -> bool:
    return subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], capture_output=True).returncode == 0


def _key(i: int) -> pb.StoresKey:
    return pb.StoresKey(Floats=[float(i + 1), 1.0, -float(i % 7) - 0.5])


def _set(server: ServerProc, i: int, value: bytes) -> None:
    server.unary("StoresSet", pb.StoresSetOptions(Keys=[_key(i)], Values=[pb.StoresValue(Bytes=value)]))


def _stored(server: ServerProc, n: int) -> dict[int, bytes]:
    reply = server.unary("StoresGet", pb.StoresGetOptions(Keys=[_key(i) for i in range(n)]))
    index = {tuple(round(x, 4) for x in _key(i).Floats): i for i in range(n)}
    return {index[tuple(round(x, 4) for x in k.Floats)]: v.Bytes for k, v in zip(reply.Keys, reply.Values, strict=True)}  # type: ignore[attr-defined]


def _store(path: Path, **kw: object) -> ServerProc:
    server = spawn("local-store", "--store-path", str(path), **kw)  # type: ignore[arg-type]
    result = server.load(pb.ModelOptions(Model="store://faults"))
    if not result.success:
        server.close()
        raise AssertionError(f"store did not open: {result.message}")
    return server


def test_full_store_directory_gives_a_clear_error_and_keeps_acknowledged_writes(tmp_path: Path) -> None:
    mnt = tmp_path / "disk"
    with small_filesystem(mnt, "1m") as mounted:
        limits = None if mounted else {"RLIMIT_FSIZE": 256 << 10}  # no mount: the log's size is capped
        filler = mnt / "filler"
        if mounted:
            filler.write_bytes(b"\0" * (256 << 10))
        server = _store(mnt, limits=limits)
        acked: dict[int, bytes] = {}
        failure = None
        try:
            for i in range(2000):
                value = bytes([i % 251]) * 4096
                try:
                    _set(server, i, value)
                except grpc.RpcError as exc:
                    failure = exc
                    break
                acked[i] = value
            assert failure is not None, "the disk never filled up"
            print(f"\nafter {len(acked)} acknowledged writes: {failure.code().name}: {failure.details()}")
            assert failure.code().name in CLEAR_STORE_ERRORS, (failure.code(), failure.details())
            assert any(w in failure.details().lower() for w in ("space", "too large", "disk", "quota")), \
                failure.details()
            assert server.alive() and server.health()
            assert _stored(server, len(acked) + 1) == acked  # reads still served, nothing half-written
            if mounted:  # space comes back: writes resume, and must not land after a torn record
                filler.unlink()
                for i in range(len(acked) + 1, len(acked) + 11):
                    _set(server, i, b"late")
                    acked[i] = b"late"
        finally:
            server.close()
        again = _store(mnt)
        try:
            assert _stored(again, max(acked) + 1) == acked, "acknowledged writes lost after the disk filled"
        finally:
            again.close()


def test_read_only_store_directory_gives_a_clear_error_and_keeps_acknowledged_writes(tmp_path: Path) -> None:
    mnt = tmp_path / "disk"
    with small_filesystem(mnt, "4m") as mounted:
        if not mounted and os.geteuid() == 0:
            pytest.skip("cannot mount a tmpfs and root ignores file modes: no way to make a directory read-only")
        server = _store(mnt)
        try:
            for i in range(20):
                _set(server, i, f"v{i}".encode())
        finally:
            assert server.close() == 0
        if mounted:
            assert _remount(mnt, "ro")
        else:
            for p in [mnt, *mnt.rglob("*")]:
                p.chmod(0o555 if p.is_dir() else 0o444)
        server = spawn("local-store", "--store-path", str(mnt))
        try:
            result = server.load(pb.ModelOptions(Model="store://faults"))
            if result.success:  # opened for reading: writes must fail clearly, reads must work
                assert _stored(server, 20) == {i: f"v{i}".encode() for i in range(20)}
                with pytest.raises(grpc.RpcError) as err:
                    _set(server, 99, b"x")
                assert err.value.code().name in CLEAR_STORE_ERRORS, (err.value.code(), err.value.details())
                assert "read-only" in err.value.details().lower() or "permission" in err.value.details().lower()
            else:
                message = result.message.lower()
                assert "read-only" in message or "permission" in message, result.message
            assert server.alive() and server.health()
        finally:
            server.close()
        if mounted:
            assert _remount(mnt, "rw")
        else:
            for p in [mnt, *mnt.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
        again = _store(mnt)
        try:
            assert _stored(again, 20) == {i: f"v{i}".encode() for i in range(20)}
        finally:
            again.close()


# ---- a model file truncated on disk --------------------------------------------------------------
def _truncated_copy(src: Path, dst: Path, keep: int) -> Path:
    with src.open("rb") as f:
        dst.write_bytes(f.read(keep))
    return dst


def test_truncated_gguf_fails_load_with_the_reason_and_the_server_keeps_serving(tmp_path: Path) -> None:
    from inferd.engines.llama import default_model_path

    broken = _truncated_copy(Path(default_model_path()), tmp_path / "truncated.gguf", 8 << 20)
    server = spawn("llama-cpp")
    try:
        result = server.load(pb.ModelOptions(ModelFile=str(broken), Threads=1, ContextSize=512))
        assert not result.success
        assert "truncated.gguf" in result.message or "load" in result.message.lower(), result.message
        assert server.alive() and server.health()
        assert server.load().success
        reply = server.unary("Predict", pb.PredictOptions(Prompt="Hi", Tokens=4, IgnoreEOS=True))
        assert reply.tokens == 4  # type: ignore[attr-defined]
    finally:
        server.close()


def test_truncated_embedding_weights_fail_load_with_the_reason(tmp_path: Path) -> None:
    from inferd.engines.embeddings import resolve_model_dir

    packaged = resolve_model_dir()
    copy = tmp_path / "model"
    shutil.copytree(packaged, copy)
    weights = copy / "model.safetensors"
    _truncated_copy(packaged / "model.safetensors", weights, weights.stat().st_size // 3)
    server = spawn("sentence-embeddings")
    try:
        result = server.load(pb.ModelOptions(ModelFile=str(copy), Threads=1))
        assert not result.success and result.message, result.message
        assert server.alive() and server.health()
        assert server.load().success
        reply = server.unary("Embedding", pb.PredictOptions(Embeddings="still serving"))
        assert len(reply.embeddings) == 384  # type: ignore[attr-defined]
    finally:
        server.close()
