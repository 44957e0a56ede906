"""Seed 002's ``inference.Inference`` service, on the same port as ``backend.Backend``.

Chat/Generate/Embedding run on the real llama-cpp engine (SmolLM2); image jobs on a
small fixture backend whose GenerateImage writes a file (no image weights ship, so the
job tracking is proven on that backend and the real image backend is only asked to
refuse cleanly); memory management on the same server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from inferd.backends import Backend, CallContext
from inferd.client import load_client_config
from inferd.client.config import ClientConfigError, parse_client_config
from inferd.errors import InvalidArgument
from inferd.proto import backend_pb2 as pb
from inferd.proto import inference_pb2 as ipb
from inferd.proto import inference_pb2_grpc
from tests.fixtures_backend import EchoBackend
from tests.helpers import running_server


class PainterBackend(Backend):
    """Writes a tiny file per GenerateImage after ``delay`` seconds; prompt 'fail' fails."""

    name = "painter"
    needs_model = False

    def __init__(self, delay: float = 0.3) -> None:
        super().__init__()
        self.delay = delay

    def generate_image(self, request: pb.GenerateImageRequest, ctx: CallContext) -> pb.Result:
        time.sleep(self.delay)
        if request.positive_prompt == "fail":
            raise InvalidArgument("the painter refuses", "positive_prompt")
        Path(request.dst).write_bytes(f"{request.width}x{request.height}:{request.positive_prompt}".encode())
        return pb.Result(success=True, message="painted")


@pytest.fixture(scope="module")
def smol_server() -> Any:
    pytest.importorskip("llama_cpp")
    from inferd.backends.llama_cpp import LlamaCppBackend

    loop = asyncio.new_event_loop()

    async def start() -> Any:
        ctx = running_server(LlamaCppBackend())
        server = await ctx.__aenter__()
        result = await server.load(pb.ModelOptions(ContextSize=2048, Threads=1))
        assert result.success, result.message
        return ctx, server

    ctx, server = loop.run_until_complete(start())
    yield loop, server
    loop.run_until_complete(ctx.__aexit__(None, None, None))
    loop.close()


def run(loop_server: Any, coro_fn: Any) -> Any:
    loop, server = loop_server

    async def go() -> Any:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            return await coro_fn(inference_pb2_grpc.InferenceStub(ch))

    return loop.run_until_complete(go())


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [m async for m in stream]


def test_chat_stream_and_generate_stream(smol_server: Any) -> None:
    question = "What is the capital of France? Answer in one sentence."
    chat = ipb.ChatRequest(messages=[ipb.ChatMessage(role="user", content=question)],
                           params=ipb.SamplingParams(max_tokens=24, temperature=0))
    replies = run(smol_server, lambda stub: collect(stub.ChatStream(chat)))
    assert "Paris" in "".join(r.content for r in replies)
    last = replies[-1]
    assert last.done and last.finish_reason in ("stop", "length") and last.usage.completion_tokens > 0
    assert last.usage.prompt_tokens > 5 and last.usage.tokens_per_second > 0
    gen = ipb.GenerateRequest(prompt="The capital of France is", params=ipb.SamplingParams(max_tokens=5))
    replies = run(smol_server, lambda stub: collect(stub.GenerateStream(gen)))
    assert "".join(r.text for r in replies) and replies[-1].done and replies[-1].finish_reason == "length"


def test_chat_stream_json_schema_and_bad_input(smol_server: Any) -> None:
    schema = '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}'
    chat = ipb.ChatRequest(messages=[ipb.ChatMessage(role="user", content="Name a city.")], json_schema=schema,
                           params=ipb.SamplingParams(max_tokens=32, temperature=0))
    replies = run(smol_server, lambda stub: collect(stub.ChatStream(chat)))
    import json

    assert isinstance(json.loads("".join(r.content for r in replies))["city"], str)
    for bad, field in ((ipb.ChatRequest(), "messages"),
                       (ipb.ChatRequest(messages=[ipb.ChatMessage(role="user", content="hi")],
                                        params=ipb.SamplingParams(top_p=3)), "TopP")):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            run(smol_server, lambda stub, b=bad: collect(stub.ChatStream(b)))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in exc.value.details()


def test_get_embedding(smol_server: Any) -> None:
    reply = run(smol_server, lambda stub: stub.GetEmbedding(ipb.EmbeddingRequest(texts=["one", "two words"])))
    assert len(reply.embeddings) == 2 and reply.dimensions == len(reply.embeddings[0].values) > 100
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        run(smol_server, lambda stub: stub.GetEmbedding(ipb.EmbeddingRequest(texts=["ok", ""])))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "texts[1]" in exc.value.details()


def test_image_methods_name_the_backend_without_image_support(smol_server: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        run(smol_server, lambda stub: stub.GenerateImage(ipb.ImageRequest(prompt="a cat")))
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED and "llama-cpp" in exc.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        run(smol_server, lambda stub: stub.CheckImageStatus(ipb.ImageStatusRequest(job_id="img-404")))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_memory_stats_manage_vram_and_clear(smol_server: Any) -> None:
    stats = run(smol_server, lambda stub: stub.GetMemoryStats(ipb.MemoryStatsRequest()))
    assert stats.model_loaded and stats.backend == "llama-cpp" and stats.process_rss_bytes > 50e6
    assert stats.system_total_bytes > stats.system_available_bytes > 0 and "rss" in stats.breakdown

    async def session(stub: Any) -> list[ipb.MemoryReport]:
        call = stub.ManageVRAM()
        reports = []
        for command in (ipb.VRAMCommand(action=ipb.VRAMCommand.STATS),
                        ipb.VRAMCommand(action=ipb.VRAMCommand.UNLOAD),
                        ipb.VRAMCommand(action=ipb.VRAMCommand.LOAD, options_json="{not json"),
                        ipb.VRAMCommand(action=ipb.VRAMCommand.LOAD, options_json='{"ContextSize": 2048}')):
            await call.write(command)
            reports.append(await call.read())
            while reports[-1].event == "changed":  # pushed on load/unload, before the command's answer
                reports.append(await call.read())
        await call.done_writing()
        while (rest := await call.read()) != grpc.aio.EOF:
            reports.append(rest)
        return reports

    reports = run(smol_server, session)
    events = [r.event for r in reports]
    assert events == ["stats", "changed", "unloaded", "error", "changed", "loaded"], events
    unloaded, bad, loaded = reports[2], reports[3], reports[5]
    assert not unloaded.model_loaded and unloaded.success
    assert not bad.success and "INVALID_ARGUMENT" in bad.message and "options_json" in bad.message
    assert loaded.model_loaded and loaded.success
    cleared = run(smol_server, lambda stub: stub.ClearMemory(ipb.ClearMemoryRequest()))
    assert cleared.event == "cleared" and not cleared.model_loaded and cleared.success
    assert cleared.process_rss_bytes < stats.process_rss_bytes
    loop, server = smol_server
    assert loop.run_until_complete(server.load(pb.ModelOptions(ContextSize=2048, Threads=1))).success


async def test_image_jobs_are_tracked() -> None:
    async with running_server(PainterBackend()) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        job = await stub.GenerateImage(ipb.ImageRequest(prompt="a cat", width=8, height=4))
        assert job.state in (ipb.ImageJob.QUEUED, ipb.ImageJob.RUNNING) and job.job_id
        failing = await stub.EditImage(ipb.EditImageRequest(image=ipb.ImageRequest(prompt="fail"),
                                                            source_path="/tmp/x.png"))
        status = await stub.CheckImageStatus(ipb.ImageStatusRequest(job_id=job.job_id))
        assert status.state == ipb.ImageJob.RUNNING
        for _ in range(100):
            status = await stub.CheckImageStatus(ipb.ImageStatusRequest(job_id=job.job_id))
            if status.state == ipb.ImageJob.SUCCEEDED:
                break
            await asyncio.sleep(0.05)
        assert status.state == ipb.ImageJob.SUCCEEDED and status.finished_at >= status.created_at
        assert Path(status.output_path).read_bytes() == b"8x4:a cat"
        Path(status.output_path).unlink()
        for _ in range(100):
            failed = await stub.CheckImageStatus(ipb.ImageStatusRequest(job_id=failing.job_id))
            if failed.state == ipb.ImageJob.FAILED:
                break
            await asyncio.sleep(0.05)
        assert failed.state == ipb.ImageJob.FAILED and "the painter refuses" in failed.error
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.EditImage(ipb.EditImageRequest(image=ipb.ImageRequest(prompt="x")))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "source_path" in exc.value.details()


async def test_image_job_queue_is_bounded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from inferd.server import inference_servicer

    monkeypatch.setattr(inference_servicer, "MAX_PENDING_JOBS", 2)
    async with running_server(PainterBackend(delay=0.5)) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        for i in range(2):
            await stub.GenerateImage(ipb.ImageRequest(prompt="slow", output_path=str(tmp_path / f"{i}.png")))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.GenerateImage(ipb.ImageRequest(prompt="one too many"))
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in exc.value.details()


async def test_services_setting_selects_what_is_served() -> None:
    async with running_server(EchoBackend(), services="backend") as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await inference_pb2_grpc.InferenceStub(ch).GetMemoryStats(ipb.MemoryStatsRequest())
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    async with running_server(EchoBackend(), services="inference", require_api_key=True, api_key="k") as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.GetMemoryStats(ipb.MemoryStatsRequest())
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED  # same auth as backend.Backend
        report = await stub.GetMemoryStats(ipb.MemoryStatsRequest(), metadata=(("authorization", "Bearer k"),))
        assert report.backend == "echo" and not report.model_loaded


async def test_go_client_config_yaml(tmp_path: Path) -> None:
    async with running_server(EchoBackend(), require_api_key=True, api_key="secret") as server:
        (tmp_path / "config.yaml").write_text(
            "inference:\n  use_grpc: true\n"
            f"  grpc_address: \"127.0.0.1:{server.port}\"\n  use_secure_connection: false\n  api_key: \"secret\"\n")
        cfg = load_client_config(tmp_path / "config.yaml")
        assert cfg.address == f"127.0.0.1:{server.port}" and cfg.options.api_key == "secret" and not cfg.options.tls
        from inferd.client import client_from_config

        client = client_from_config(tmp_path / "config.yaml")
        try:
            assert await client.health_check(timeout=5)
        finally:
            await client.close()
    for doc, message in (({"inference": {"use_grpc": False, "grpc_address": "h:1"}}, "gRPC only"),
                         ({"grpc_address": "nohost"}, "HOST:PORT"),
                         ({"inference": {"grpc_address": "h:1", "colour": 1}}, "unknown key"),
                         ({"inference": {"grpc_address": "h:1", "use_secure_connection": "maybe"}}, "true or false")):
        with pytest.raises(ClientConfigError, match=message):
            parse_client_config(doc)
    assert parse_client_config({"grpc_address": "h:1", "use_secure_connection": "true"}).options.tls
