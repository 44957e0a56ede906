"""Security across every backend: credentials on every rpc, TLS/mTLS, sandboxed chat templates,
and paths confined to INFERD_MODELS_DIR.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from inferd.proto import backend_pb2 as pb
from inferd.protocol import LLM_RPCS, RPCS, Rpc
from tests.certs import make_pki
from tests.reliability.conftest import FLEET_KEY as KEY
from tests.reliability.conftest import fleet_member
from tests.reliability.servers import BackendUnavailable, ServerProc, registered_backends, spawn

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
              "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
BAD_CREDENTIALS = {
    "none": (),
    "wrong x-api-key": (("x-api-key", "wrong"),),
    "wrong bearer": (("authorization", "Bearer wrong"),),
    "raw key without Bearer": (("authorization", KEY),),
    "empty bearer": (("authorization", "Bearer "),),
    "key prefix": (("x-api-key", KEY[:-1]),),
}


def _identity(data: bytes) -> bytes:
    return data


def _code(channel: grpc.Channel, path: str, kind: str, metadata: tuple) -> grpc.StatusCode:
    try:
        if kind == "unary":
            channel.unary_unary(path, _identity, _identity)(b"", timeout=10, metadata=metadata)
        elif kind == "stream":
            for _ in channel.unary_stream(path, _identity, _identity)(b"", timeout=10, metadata=metadata):
                pass
        else:
            for _ in channel.stream_stream(path, _identity, _identity)(iter([b"\x3a\x00"]), timeout=10,
                                                                       metadata=metadata):
                pass
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _every_method() -> list[tuple[str, str]]:
    rpcs: list[Rpc] = [*RPCS.values(), *LLM_RPCS.values()]
    out = [(r.path, "stream" if r.streaming else "unary") for r in rpcs]
    return out + [(HEALTH_CHECK, "unary")] + [(p, "bidi") for p in REFLECTION]


@contextlib.contextmanager
def _spawned(backend: str, *args: str) -> Iterator[ServerProc]:
    try:
        server = spawn(backend, *args)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("backend", registered_backends())
def test_every_rpc_refuses_missing_or_wrong_credentials(backend: str, fleet) -> None:
    server = fleet_member(fleet, backend)
    assert server.metadata == (("x-api-key", KEY),)
    channel = server.channel()
    wrong = []
    for path, kind in _every_method():
        for label, metadata in BAD_CREDENTIALS.items():
            code = _code(channel, path, kind, metadata)
            if code != grpc.StatusCode.UNAUTHENTICATED:
                wrong.append(f"{path} with {label}: {code.name}")
    assert not wrong, "\n".join(wrong)
    good = (("x-api-key", KEY),)
    assert _code(channel, RPCS["Health"].path, "unary", good) == grpc.StatusCode.OK
    assert _code(channel, RPCS["Status"].path, "unary", (("authorization", f"Bearer {KEY}"),)) == grpc.StatusCode.OK
    assert _code(channel, HEALTH_CHECK, "unary", good) == grpc.StatusCode.OK


# ---- TLS and mTLS on a real backend process ----------------------------------------------------
def _tls_health(address: str, ca: str, cert: str | None = None, key: str | None = None) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(
        Path(ca).read_bytes(),
        Path(key).read_bytes() if key else None,
        Path(cert).read_bytes() if cert else None,
    )
    with grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        return _code(ch, RPCS["Health"].path, "unary", ())


def test_tls_refuses_a_client_trusting_another_ca_and_mtls_a_client_without_a_cert(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = ("--tls", "true", "--cert-file", pki["server_cert"], "--key-file", pki["server_key"])
    with _spawned("local-store", *tls) as server:
        assert _tls_health(server.address, pki["ca"]) == grpc.StatusCode.OK
        assert _tls_health(server.address, pki["other_ca"]) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(server.address) as plain:
            assert _code(plain, RPCS["Health"].path, "unary", ()) == grpc.StatusCode.UNAVAILABLE
    with _spawned("local-store", *tls, "--client-ca-file", pki["ca"]) as server:
        assert _tls_health(server.address, pki["ca"], pki["client_cert"], pki["client_key"]) == grpc.StatusCode.OK
        assert _tls_health(server.address, pki["ca"]) == grpc.StatusCode.UNAVAILABLE
        assert _tls_health(server.address, pki["ca"], pki["rogue_cert"], pki["rogue_key"]) == grpc.StatusCode.UNAVAILABLE


# ---- chat templates are sandboxed ------------------------------------------------------------------
EVIL_TEMPLATES = {
    "class walk": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals via cycler": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "globals via lipsum": "{{ lipsum.__globals__['os'].listdir('/') }}",
    "attr filter": "{{ messages|attr('__class__') }}",
    "include a file": "{% include '/etc/passwd' %}",
    "import a module": "{% import 'os' as os %}{{ os }}",
    "extends a file": "{% extends '/etc/hostname' %}",
    "mutate the input": "{{ messages.append({'role': 'system', 'content': 'pwned'}) }}",
    "huge range": "{% for i in range(10**9) %}{% endfor %}",
    "function globals": "{{ raise_exception.__globals__ }}",
    "format string escape": "{{ '{0.__class__.__mro__}'.format(messages) }}",
}


@pytest.mark.parametrize("name", sorted(EVIL_TEMPLATES))
def test_chat_template_cannot_reach_files_modules_or_attributes(name: str) -> None:
    from inferd.engines.llama.chat_template import ChatTemplate

    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError) as err:
        rendered = ChatTemplate("evil", EVIL_TEMPLATES[name]).render(messages)
        raise AssertionError(f"rendered: {rendered[:200]!r}")  # reached only if nothing refused it
    assert "rendered:" not in str(err.value), str(err.value)
    assert messages == [{"role": "user", "content": "hi"}]


# ---- INFERD_MODELS_DIR confinement -----------------------------------------------------------------
def _refused(result: pb.Result) -> bool:
    return not result.success and "INFERD_MODELS_DIR" in result.message


def test_llama_paths_cannot_escape_the_models_dir(tmp_path: Path) -> None:
    from inferd.engines.llama import default_model_path

    real = Path(default_model_path())
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    shutil.copy(real, models / "smol.gguf")
    os.symlink(real, models / "link.gguf")
    shutil.copy(real, outside / "smol.gguf")
    (outside / "template.jinja").write_text("SECRET {{ messages[0].content }}")
    base = dict(Threads=1, ContextSize=512)
    escapes = {
        "absolute ModelFile": pb.ModelOptions(ModelFile=str(real), **base),
        "../ ModelFile": pb.ModelOptions(ModelFile="../outside/smol.gguf", **base),
        "../ Model": pb.ModelOptions(Model="../outside/smol.gguf", **base),
        "symlink out": pb.ModelOptions(ModelFile="link.gguf", **base),
        "ModelPath outside": pb.ModelOptions(ModelPath=str(outside), Model="smol.gguf", **base),
        "LoraAdapter ../": pb.ModelOptions(ModelFile="smol.gguf", LoraAdapter="../outside/smol.gguf", **base),
        "LoraAdapters absolute": pb.ModelOptions(ModelFile="smol.gguf", LoraAdapters=["/etc/hostname"], **base),
        "chat_template file outside": pb.ModelOptions(
            ModelFile="smol.gguf", Options=[f"chat_template:{outside / 'template.jinja'}"], **base),
    }
    with _spawned("llama-cpp", "--models-dir", str(models)) as server:
        wrong = {}
        for label, options in escapes.items():
            result = server.load(options)
            if not _refused(result):
                wrong[label] = (result.success, result.message)
        assert not wrong, wrong
        assert server.load(pb.ModelOptions(ModelFile="smol.gguf", **base)).success
        assert server.load(pb.ModelOptions(ModelFile=str(models / "smol.gguf"), **base)).success


def test_llama_evil_chat_template_is_refused_through_the_backend(tmp_path: Path) -> None:
    evil = "{{ cycler.__init__.__globals__.os.popen('id').read() }}"
    with _spawned("llama-cpp") as server:
        loaded = server.load(pb.ModelOptions(Threads=1, ContextSize=512, Options=[f"chat_template:{evil}"]))
        if loaded.success:
            with pytest.raises(grpc.RpcError) as err:
                server.unary("Predict", pb.PredictOptions(
                    Messages=[pb.Message(role="user", content="hi")], UseTokenizerTemplate=True, Tokens=4))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "unsafe" in err.value.details(), err.value.details()
        else:
            assert "unsafe" in loaded.message or "template" in loaded.message, loaded.message
        assert server.health()


def test_embedding_paths_cannot_escape_the_models_dir(tmp_path: Path) -> None:
    from inferd.engines.embeddings import resolve_model_dir

    packaged = resolve_model_dir()
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    shutil.copytree(packaged, models / "minilm")
    shutil.copytree(packaged, outside / "minilm")
    os.symlink(packaged, models / "link")
    escapes = {
        "absolute ModelFile": pb.ModelOptions(ModelFile=str(packaged), Threads=1),
        "../ ModelFile": pb.ModelOptions(ModelFile="../outside/minilm", Threads=1),
        "../ Model": pb.ModelOptions(Model="../outside/minilm", Threads=1),
        "symlink out": pb.ModelOptions(ModelFile="link", Threads=1),
        "ModelPath outside": pb.ModelOptions(ModelPath=str(outside), Model="minilm", Threads=1),
    }
    with _spawned("sentence-embeddings", "--models-dir", str(models)) as server:
        wrong = {}
        for label, options in escapes.items():
            result = server.load(options)
            if not _refused(result):
                wrong[label] = (result.success, result.message)
        assert not wrong, wrong
        assert server.load(pb.ModelOptions(ModelFile="minilm", Threads=1)).success


def test_store_paths_cannot_escape_the_models_dir(tmp_path: Path) -> None:
    models = tmp_path / "models"
    stores = models / "stores"
    stores.mkdir(parents=True)
    with _spawned("local-store", "--models-dir", str(models), "--store-path", str(stores)) as server:
        for name in ("store://../../escape", "store://..", "store:///tmp/escape", "../escape"):
            result = server.load(pb.ModelOptions(Model=name))
            if result.success:
                server.unary("StoresSet", pb.StoresSetOptions(Keys=[pb.StoresKey(Floats=[1.0, 2.0])],
                                                              Values=[pb.StoresValue(Bytes=b"x")]))
        created = {p for p in tmp_path.rglob("*") if not p.is_relative_to(stores) and p != stores}
        assert created == {models}, sorted(map(str, created))
    outside = tmp_path / "elsewhere"
    with _spawned("local-store", "--models-dir", str(models), "--store-path", str(outside)) as server:
        result = server.load(pb.ModelOptions(Model="store://s"))
        assert _refused(result), result.message
        assert not outside.exists() or not any(outside.iterdir())
