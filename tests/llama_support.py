"""Shared pieces of the llama-cpp tests: loading the packaged SmolLM2 once, request helpers."""

from __future__ import annotations

import asyncio
import json

from inferd.backends.context import CallContext
from inferd.client import new_client
from inferd.proto import backend_pb2 as pb
from inferd.runtime import BackendRuntime

CHATML = "<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOLS = json.dumps([{
    "type": "function",
    "function": {"name": "get_weather", "description": "Current weather for a city", "parameters": WEATHER_SCHEMA},
}])


def load(backend, options: pb.ModelOptions) -> pb.Result:
    """LoadModel through the runtime (as the server does), outside any test's event loop."""
    runtime = BackendRuntime(backend, max_workers=2)
    try:
        return asyncio.run(runtime.load_model(options, CallContext("LoadModel")))
    finally:
        runtime.shutdown()


def smol_options(**kw) -> pb.ModelOptions:
    # Threads 1: the suite shares 2 cores with other work (docs/llama-cpp.md, "Threads")
    kw.setdefault("ContextSize", 1024)
    kw.setdefault("Threads", 1)
    kw.setdefault("MMap", True)
    kw.setdefault("Options", ["use_jinja:true", "parallel:4"])
    return pb.ModelOptions(**kw)


async def client_for(server):
    return new_client(f"127.0.0.1:{server.port}", parallel=True)


def greedy(**kw) -> pb.PredictOptions:
    kw.setdefault("Temperature", 0.0)
    return pb.PredictOptions(**kw)


async def stream_text(client, request: pb.PredictOptions) -> tuple[str, list[pb.Reply]]:
    replies = [r async for r in client.predict_stream(request)]
    return b"".join(r.message for r in replies).decode("utf-8"), replies
