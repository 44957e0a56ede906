"""The ``llama-cpp`` backend over real gRPC, on the packaged SmolLM2-135M-Instruct.

The model is loaded once for the module (through the runtime's LoadModel path); each
test starts its own server around that loaded backend, because pytest-asyncio gives
every test its own event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re

import grpc
import pytest

pytest.importorskip("llama_cpp")

from inferd.backends.llama_cpp import LlamaCppBackend, plan_load  # noqa: E402
from inferd.client import RpcError, new_client  # noqa: E402
from inferd.engines.llama import default_model_path  # noqa: E402
from inferd.errors import LoadError  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402
from inferd.proto import llm_pb2, llm_pb2_grpc  # noqa: E402
from tests.helpers import running_server, spawned_server  # noqa: E402
from tests.llama_support import (  # noqa: E402
    CHATML,
    SMOL_SYSTEM,
    WEATHER_TOOLS,
    client_for,
    greedy,
    load,
    smol_options,
    stream_text,
)


@pytest.fixture(scope="module")
def smol():
    backend = LlamaCppBackend()
    result = load(backend, smol_options())  # 4 slots, small context for "prompt longer than context"
    assert result.success, result.message
    yield backend
    backend._free()


_client = client_for


# ---- LoadModel --------------------------------------------------------------------------
def test_load_resolves_model_names(tmp_path) -> None:
    default = default_model_path()
    assert plan_load(pb.ModelOptions()).config.path == default
    assert plan_load(pb.ModelOptions(Model=default)).config.path == default
    folder, name = os.path.split(default)
    assert plan_load(pb.ModelOptions(Model=name, ModelPath=folder)).config.path == default
    assert plan_load(pb.ModelOptions(Model=name, ModelFile=default, ModelPath=folder)).config.path == default


def test_load_maps_model_options() -> None:
    plan = plan_load(pb.ModelOptions(
        ContextSize=2048, NBatch=256, Threads=3, MMap=True, MLock=True, Seed=42, FlashAttention="off",
        CacheTypeKey="q8_0", CacheTypeValue="f16", NoKVOffload=True, RopeFreqBase=10000.0, RopeScaling="linear",
        RopeFreqScale=0.5, YarnExtFactor=0.25, LoraAdapters=["a.gguf"], LoraScales=[0.5], ModelPath="/m",
        Overrides=["tokenizer.ggml.add_bos_token=bool:false"],
        Options=["slots:3", "queue:7", "kv_unified:false", "some_other_backend_option:1"],
    ))
    c = plan.config
    assert (c.n_ctx, c.n_batch, c.threads, c.use_mmap, c.use_mlock, c.seed) == (2048, 256, 3, True, True, 42)
    assert (c.flash_attn, c.cache_type_k, c.cache_type_v, c.offload_kqv) == ("off", "q8_0", "f16", False)
    assert (c.rope_freq_base, c.rope_scaling, c.rope_freq_scale, c.yarn_ext_factor) == (10000.0, "linear", 0.5, 0.25)
    assert c.lora == [("/m/a.gguf", 0.5)] and c.kv_overrides == ["tokenizer.ggml.add_bos_token=bool:false"]
    assert (c.slots, plan.max_waiting, c.kv_unified) == (3, 7, False)
    assert plan.ignored == ["some_other_backend_option:1"]
    with pytest.raises(LoadError, match="parallel"):
        plan_load(pb.ModelOptions(Options=["parallel:zero"]))


@pytest.mark.parametrize("content, reason", [(None, "not found"), (b"garbage!", "not a GGUF"),
                                             (b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "could not load")])
async def test_load_failure_is_result_false_with_reason(tmp_path, content, reason) -> None:
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    backend = LlamaCppBackend()
    async with running_server(backend) as server:
        client = await _client(server)
        result = await client.load_model(pb.ModelOptions(ModelFile=str(path)))
        assert not result.success and reason in result.message
        status = await client.status(pb.HealthMessage())
        assert status.state == pb.StatusResponse.ERROR
        await client.close()


async def test_bad_load_option_values_fail_the_load() -> None:
    backend = LlamaCppBackend()
    async with running_server(backend) as server:
        client = await _client(server)
        result = await client.load_model(pb.ModelOptions(FlashAttention="sometimes"))
        assert not result.success and "FlashAttention" in result.message
        result = await client.load_model(pb.ModelOptions(LoraAdapter="/nonexistent/lora.gguf"))
        assert not result.success and "LoRA" in result.message
        await client.close()


# ---- Predict / PredictStream -------------------------------------------------------------
async def test_predict_and_stream_agree_and_report_usage(smol) -> None:
    async with running_server(smol) as server:
        client = await _client(server)
        req = greedy(Prompt=CHATML.format(sys=SMOL_SYSTEM, user="Name a color."), Tokens=10, IgnoreEOS=True)
        reply = await client.predict(req)
        text, replies = await stream_text(client, req)
        assert reply.message.decode() == text and text.strip()
        assert reply.tokens == 10 and replies[-1].tokens == 10
        assert reply.prompt_tokens > 10 and replies[-1].prompt_tokens == reply.prompt_tokens
        assert reply.timing_prompt_processing > 0 and reply.timing_token_generation > 0
        assert len(replies) >= 3  # streamed, not one blob
        await client.close()


async def test_chat_uses_smollm2_own_template(smol) -> None:
    question = "What is the capital of France?"
    async with running_server(smol) as server:
        client = await _client(server)
        meta = await client.model_metadata(pb.ModelOptions())
        assert meta.rendered_template.startswith("<|im_start|>system\n" + SMOL_SYSTEM)
        assert not meta.supports_thinking
        chat = await client.predict(greedy(
            UseTokenizerTemplate=True, Prompt="", Tokens=12,
            Messages=[pb.Message(role="user", content=question)]))
        raw = await client.predict(greedy(Prompt=CHATML.format(sys=SMOL_SYSTEM, user=question), Tokens=12,
                                          StopPrompts=["<|im_end|>"]))
        assert chat.message == raw.message and chat.message
        assert chat.prompt_tokens == raw.prompt_tokens
        assert chat.chat_deltas[0].content == chat.message.decode()
        _, replies = await stream_text(client, greedy(
            UseTokenizerTemplate=True, Tokens=12, Messages=[pb.Message(role="user", content=question)]))
        assert all(len(r.chat_deltas) >= 1 for r in replies)  # chat chunks always say "parsed"
        assert "".join(d.content for r in replies for d in r.chat_deltas) == chat.chat_deltas[0].content
        await client.close()


async def test_tool_call_is_parsed_into_chat_deltas(smol) -> None:
    # A grammar makes the model write exactly the tool call SmolLM2's format describes.
    call = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'
    grammar = "root ::= " + json.dumps(call)
    async with running_server(smol) as server:
        client = await _client(server)
        request = greedy(
            UseTokenizerTemplate=True, Tools=WEATHER_TOOLS, ToolChoice="auto", Tokens=60, Grammar=grammar,
            Messages=[pb.Message(role="user", content="What is the weather in Paris?")])
        reply = await client.predict(request)
        assert reply.message.decode() == call
        calls = [t for d in reply.chat_deltas for t in d.tool_calls]
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
        assert calls[0].id
        _, replies = await stream_text(client, request)
        streamed = [t for r in replies for d in r.chat_deltas for t in d.tool_calls]
        assert [(c.name, json.loads(c.arguments)) for c in streamed] == [("get_weather", {"city": "Paris"})]
        assert not any(d.content for r in replies for d in r.chat_deltas)
        await client.close()


async def test_seed_gives_same_output_over_grpc(smol) -> None:
    async with running_server(smol) as server:
        client = await _client(server)
        req = pb.PredictOptions(Prompt="Once upon a time", Tokens=10, Temperature=1.2, TopK=0, TopP=1.0,
                                Seed=99, IgnoreEOS=True)
        a = await client.predict(req)
        b = await client.predict(req)
        assert a.message == b.message
        await client.close()


async def test_stop_prompt_never_emitted_in_stream(smol) -> None:
    async with running_server(smol) as server:
        client = await _client(server)
        base = greedy(Prompt=CHATML.format(sys=SMOL_SYSTEM, user="Count from 1 to 10 with commas."),
                      Tokens=30, IgnoreEOS=True)
        full, _ = await stream_text(client, base)
        stop = full[full.index("4"):full.index("4") + 3]
        base.StopPrompts.append(stop)
        text, replies = await stream_text(client, base)
        assert stop not in text and text == full[: full.index(stop)]
        await client.close()


async def test_logprobs_reply_is_openai_json(smol) -> None:
    async with running_server(smol) as server:
        client = await _client(server)
        reply = await client.predict(greedy(Prompt="The sky is", Tokens=3, IgnoreEOS=True, Logprobs=1,
                                            TopLogprobs=2))
        data = json.loads(reply.logprobs)
        assert len(data["content"]) == 3
        assert {"token", "logprob", "bytes", "top_logprobs"} <= set(data["content"][0])
        assert len(data["content"][0]["top_logprobs"]) == 2
        await client.close()


@pytest.mark.parametrize("fields, field", [
    ({"Tokens": -1}, "Tokens"),
    ({"TopP": 1.5}, "TopP"),
    ({"LogitBias": "{not json"}, "LogitBias"),
    ({"LogitBias": '{"5": "big"}'}, "LogitBias"),
    ({"Grammar": '{"type": "object", '}, "Grammar"),
    ({"Grammar": "root ::= ( unclosed"}, "Grammar"),
    ({"Images": ["aGVsbG8="]}, "Images"),
    ({"Mirostat": 3}, "Mirostat"),
    ({"Tools": "[not json", "UseTokenizerTemplate": True, "Messages": [pb.Message(role="user", content="x")]},
     "Tools"),
])
async def test_bad_options_are_invalid_argument(smol, fields, field) -> None:
    async with running_server(smol) as server:
        client = await _client(server)
        for call in (client.predict, None):
            with pytest.raises(RpcError) as info:
                if call is not None:
                    await call(pb.PredictOptions(Prompt="hi", **fields))
                else:
                    await stream_text(client, pb.PredictOptions(Prompt="hi", **fields))
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert field in info.value.details
        await client.close()


async def test_prompt_longer_than_context_names_both_numbers(smol) -> None:
    async with running_server(smol) as server:
        client = await _client(server)
        with pytest.raises(RpcError) as info:
            await client.predict(pb.PredictOptions(Prompt="hello " * 1200, Tokens=2))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details
        counted = re.search(r"has (\d+) tokens", details)
        assert "holds 1024" in details and counted and int(counted.group(1)) >= 1200
        await client.close()


async def test_four_concurrent_streams_match_alone_with_the_default_layout() -> None:
    # the default KV layout (one stream per slot, kv_unified:false) is batch-invariant
    users = ["Name a fruit.", "What is 3+3?", "Say hi.", "Name an animal."]
    reqs = [greedy(Prompt=CHATML.format(sys=SMOL_SYSTEM, user=u), Tokens=12, IgnoreEOS=True) for u in users]
    backend = LlamaCppBackend()
    async with running_server(backend) as server:
        client = await _client(server)
        result = await client.load_model(pb.ModelOptions(ContextSize=256, Threads=1))
        assert result.success and "kv_unified False" in result.message, result.message
        alone = [(await stream_text(client, r))[0] for r in reqs]
        together = await asyncio.gather(*(stream_text(client, r) for r in reqs))
        assert [t for t, _ in together] == alone
        await client.free(pb.HealthMessage())
        await client.close()


async def test_cancelled_stream_frees_its_slot(smol) -> None:
    async with running_server(smol) as server:
        client = await _client(server)
        stream = client.predict_stream(pb.PredictOptions(Prompt="Once upon a time", Tokens=2000, IgnoreEOS=True))
        got = 0
        async for _ in stream:
            got += 1
            if got == 2:
                break
        await stream.aclose()
        for _ in range(100):
            if smol.engine.scheduler.active_count() == 0:
                break
            await asyncio.sleep(0.05)
        assert smol.engine.scheduler.active_count() == 0
        generated_before = smol.engine.scheduler.total_generated
        await asyncio.sleep(0.3)
        assert smol.engine.scheduler.total_generated == generated_before  # nothing runs on
        await client.close()


async def test_embedding_tokenize_metrics_status(smol) -> None:
    async with running_server(smol) as server:
        client = await _client(server)
        emb = await client.embedding(pb.PredictOptions(Embeddings="hello world"))
        toks = await client.tokenize_string(pb.PredictOptions(Prompt="hello world"))
        emb2 = await client.embedding(pb.PredictOptions(EmbeddingTokens=list(toks.tokens)))
        assert len(emb.embeddings) == 576 and list(emb.embeddings) == pytest.approx(list(emb2.embeddings))
        assert toks.length == len(toks.tokens) >= 2
        await client.predict(greedy(Prompt="Hi", Tokens=3, IgnoreEOS=True))
        metrics = await client.get_metrics(pb.MetricsRequest())
        assert metrics.tokens_generated >= 3 and metrics.prompt_tokens_processed >= 1
        status = await client.status(pb.HealthMessage())
        assert status.state == pb.StatusResponse.READY
        assert status.memory.breakdown["llama_model_bytes"] > 10_000_000
        await client.close()


async def test_llm_service_generate_streams_from_the_engine(smol) -> None:
    async with running_server(smol) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = llm_pb2_grpc.LLMServiceStub(channel)
            prompt = CHATML.format(sys=SMOL_SYSTEM, user="Say hi.")  # SmolLM2 ends its turn soon
            tokens = [r.token async for r in stub.Generate(llm_pb2.GenerateRequest(prompt=prompt))]
        assert len(tokens) >= 1 and "".join(tokens).strip()


async def test_queue_bound_gives_resource_exhausted() -> None:
    backend = LlamaCppBackend()
    async with running_server(backend) as server:
        client = await _client(server)
        result = await client.load_model(pb.ModelOptions(ContextSize=512, Threads=1, Options=["parallel:1", "queue:0"]))
        assert result.success, result.message
        stream = client.predict_stream(pb.PredictOptions(Prompt="Once upon a time", Tokens=2000, IgnoreEOS=True))
        first = await stream.__anext__()
        assert first.message
        with pytest.raises(RpcError) as info:
            await client.predict(pb.PredictOptions(Prompt="hi", Tokens=2))
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        await stream.aclose()
        freed = await client.free(pb.HealthMessage())
        assert freed.success
        await client.close()


async def test_inferd_serve_without_a_model_serves_smollm2() -> None:
    # The `make run` path: `inferd serve` with no model loads the packaged default.
    with spawned_server("--max-workers", "2", "--model-options", '{"Threads": 1}', timeout=120) as (_proc, address):
        client = new_client(address, parallel=True)
        for _ in range(200):
            if (await client.status(pb.HealthMessage())).state == pb.StatusResponse.READY:
                break
            await asyncio.sleep(0.1)
        text, replies = await stream_text(client, pb.PredictOptions(
            UseTokenizerTemplate=True, Temperature=0, Tokens=8,
            Messages=[pb.Message(role="user", content="What is the capital of France?")]))
        assert text.strip() and len(replies) >= 2
        await client.close()


async def test_free_during_a_stream_ends_it_cleanly() -> None:
    backend = LlamaCppBackend()
    async with running_server(backend) as server:
        client = await _client(server)
        assert (await client.load_model(pb.ModelOptions(ContextSize=512, Threads=1))).success
        stream = client.predict_stream(pb.PredictOptions(Prompt="Once upon a time", Tokens=2000, IgnoreEOS=True))
        await stream.__anext__()
        assert (await client.free(pb.HealthMessage())).success
        with pytest.raises(RpcError) as info:
            async for _ in stream:
                pass
        # the runtime's lifecycle gate withdraws streams in flight before unloading
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "unloaded" in info.value.details
        assert (await client.status(pb.HealthMessage())).state == pb.StatusResponse.UNINITIALIZED
        with pytest.raises(RpcError) as info:
            await client.predict(pb.PredictOptions(Prompt="hi", Tokens=2))
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        await client.close()


@pytest.mark.parametrize("fields, field", [
    ({}, "Embeddings"),
    ({"EmbeddingTokens": [1, -3]}, "EmbeddingTokens"),
    ({"EmbeddingTokens": [10_000_000]}, "EmbeddingTokens"),
])
async def test_bad_embedding_inputs_are_invalid_argument(smol, fields, field) -> None:
    async with running_server(smol) as server:
        client = await _client(server)
        with pytest.raises(RpcError) as info:
            await client.embedding(pb.PredictOptions(**fields))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in info.value.details
        await client.close()
