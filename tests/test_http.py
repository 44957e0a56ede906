"""The OpenAI-compatible HTTP front, proven with the official ``openai`` client and ``curl -N``.

One front for the module: a supervisor (real ``inferd serve`` children: SmolLM2 on
llama-cpp, MiniLM on sentence-embeddings, the echo fixture, and one model that cannot
load) with the HTTP front in the same event loop, as ``inferd up --http`` runs them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from inferd.supervisor.async_manager import AsyncModelManager  # noqa: E402
from inferd.supervisor.config import ModelSpec, SupervisorConfig  # noqa: E402
from tests.helpers import ROOT, free_port  # noqa: E402

KEY = "sk-inferd-test"
ECHO = "tests.fixtures_backend:EchoBackend"
ENV = {"PYTHONPATH": str(ROOT)}
LLM_OPTIONS = {"ContextSize": 2048, "Threads": 1}


class Front:
    """An AsyncModelManager and its HTTP front on a private loop thread."""

    def __init__(self, config: SupervisorConfig, api_keys: tuple[str, ...] = (KEY,)) -> None:
        self.config = config
        self.api_keys = api_keys
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.manager: AsyncModelManager = self.run(self._start())

    async def _start(self) -> AsyncModelManager:
        from inferd.http.server import serve_manager

        manager = AsyncModelManager(self.config)
        await manager.start()
        self.server = await serve_manager(manager, "127.0.0.1:0", self.api_keys)
        return manager

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def run(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.server.stop())
        self.run(self.manager.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def front_config(tmp: Path) -> SupervisorConfig:
    return SupervisorConfig(models=(
        ModelSpec("smol", "llama-cpp", options=LLM_OPTIONS, parallel=True),
        ModelSpec("minilm", "sentence-embeddings", options={"Threads": 1}, parallel=True),
        ModelSpec("echo", ECHO, "test-model", env={**ENV, "INFERD_LOG_FORMAT": "json"}, parallel=True),
        ModelSpec("broken", ECHO, str(tmp / "missing.gguf"), env=ENV),
        # one slot and no waiting room: a second concurrent request is refused (429)
        ModelSpec("one-slot", "llama-cpp", options={"ContextSize": 4096, "Threads": 1,
                                                    "Options": ["parallel:1", "max_queue:0"]}, parallel=True),
    ), run_dir=str(tmp / "run"), stop_grace=2.0)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    pytest.importorskip("llama_cpp")
    f = Front(front_config(tmp_path_factory.mktemp("front")))
    try:
        yield f
    finally:
        f.close()


@pytest.fixture(scope="module")
def client(front: Front) -> Any:
    return openai.OpenAI(base_url=front.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                         "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city", "unit"]},
    },
}


# ---- models and auth ------------------------------------------------------------------------
def test_models_list_and_retrieve(client: Any) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smol", "minilm", "echo", "broken", "one-slot"]
    assert client.models.retrieve("minilm").owned_by == "inferd:sentence-embeddings"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("nope")
    assert exc.value.status_code == 404 and "nope" in str(exc.value)


def test_auth_errors(front: Front) -> None:
    bad = openai.OpenAI(base_url=front.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert exc.value.status_code == 401 and exc.value.body["code"] == "invalid_api_key"
    r = httpx.get(front.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.get(front.url + "/v1/models", headers={"Authorization": KEY})  # no "Bearer ": refused
    assert r.status_code == 401
    assert httpx.get(front.url + "/healthz").status_code == 200  # probes need no key


# ---- chat ----------------------------------------------------------------------------------
def test_chat_completion(client: Any) -> None:
    r = client.chat.completions.create(model="smol", messages=CAPITAL, temperature=0, max_tokens=24)
    choice = r.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and r.object == "chat.completion"
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_the_openai_client(client: Any) -> None:
    stream = client.chat.completions.create(model="smol", messages=CAPITAL, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_with_curl(front: Front) -> None:
    body = json.dumps({"model": "smol", "messages": CAPITAL, "temperature": 0, "max_tokens": 16, "stream": True})
    out = subprocess.run(["curl", "-sN", "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json",
                          "-d", body, front.url + "/v1/chat/completions"], capture_output=True, text=True, timeout=60)
    events = [line for line in out.stdout.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert "Paris" in "".join(p["choices"][0]["delta"].get("content", "") for p in payloads)


def test_forced_tool_choice_returns_a_valid_call(client: Any) -> None:
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = client.chat.completions.create(
            model="smol", temperature=0, max_tokens=96, tools=[WEATHER_TOOL], tool_choice=choice,
            messages=[{"role": "user", "content": "What's the weather like in Paris, in celsius?"}])
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls", (choice, msg)
        call = msg.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        args = json.loads(call.function.arguments)
        assert isinstance(args["city"], str) and args["unit"] in ("c", "f")


def test_forced_tool_choice_streams_tool_call_deltas(client: Any) -> None:
    stream = client.chat.completions.create(
        model="smol", temperature=0, max_tokens=96, tools=[WEATHER_TOOL], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "Weather in Oslo?"}])
    name, args, finish = "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or []:
            name += tc.function.name or ""
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    assert set(json.loads(args)) >= {"city", "unit"}


def test_json_schema_response_format_parses(client: Any) -> None:
    schema = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"},
                                               "population_millions": {"type": "number"}},
              "required": ["country", "capital", "population_millions"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="smol", temperature=0, max_tokens=96, messages=[{"role": "user", "content": "Describe France."}],
        response_format={"type": "json_schema", "json_schema": {"name": "country", "schema": schema}})
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"country", "capital", "population_millions"}
    assert isinstance(data["population_millions"], int | float)


def test_sampling_fields_logprobs_stop_and_seed(client: Any) -> None:
    r = client.chat.completions.create(model="smol", messages=CAPITAL, temperature=0, max_tokens=4,
                                       logprobs=True, top_logprobs=2)
    lp = r.choices[0].logprobs.content
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    assert len(lp) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)
    kw = {"model": "smol", "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
          "temperature": 1.0, "top_p": 0.9, "max_tokens": 12, "presence_penalty": 0.5, "frequency_penalty": 0.5}
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert a == b
    r = client.chat.completions.create(model="smol", messages=CAPITAL, temperature=0, max_tokens=24, stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


# ---- completions, embeddings, rerank -------------------------------------------------------------
def test_completions_plain_and_streamed(client: Any) -> None:
    r = client.completions.create(model="smol", prompt="The capital of France is", temperature=0, max_tokens=6,
                                  logprobs=1)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens > 0
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smol", prompt="The capital of France is", temperature=0, max_tokens=6, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_embeddings_float_and_base64(client: Any) -> None:
    r = client.embeddings.create(model="minilm", input=["a cat sits on the mat", "stock markets fell"])
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 384
    assert r.usage.prompt_tokens > 4
    raw = httpx.post(client.base_url.join("embeddings").__str__(), headers=auth(),
                     json={"model": "minilm", "input": "a cat sits on the mat", "encoding_format": "base64"}).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    vec = struct.unpack(f"<{len(packed) // 4}f", packed)
    assert max(abs(x - y) for x, y in zip(vec, r.data[0].embedding, strict=True)) < 1e-6


def test_embeddings_dimensions_are_truncated_and_renormalized(client: Any) -> None:
    full = client.embeddings.create(model="minilm", input="a cat").data[0].embedding
    short = client.embeddings.create(model="minilm", input="a cat", dimensions=64).data[0].embedding
    assert len(short) == 64 and abs(sum(x * x for x in short) - 1.0) < 1e-4
    scale = short[0] / full[0]
    assert all(abs(s - f * scale) < 1e-5 for s, f in zip(short, full[:64], strict=True))
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="minilm", input="a cat", dimensions=4096)


async def test_oversized_bodies_are_413() -> None:
    from inferd.http.app import create_app
    from inferd.http.source import AddressSource

    app = create_app(AddressSource({"m": "127.0.0.1:9"}), max_body_bytes=1000)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front") as h:
        big = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
        r = await h.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        async def chunks():  # no content-length: counted as it streams in
            for _ in range(10):
                yield b"x" * 500

        r = await h.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
    roomy = create_app(AddressSource({"m": "127.0.0.1:9"}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=roomy), base_url="http://front") as h:
        deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = await h.post("/v1/chat/completions", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400  # nesting past the parser's depth: a 400, not a 500


def test_rerank_jina_shape(front: Front) -> None:
    r = httpx.post(front.url + "/v1/rerank", headers=auth(), json={
        "model": "minilm", "query": "What is the capital of France?", "top_n": 2,
        "documents": ["Berlin is in Germany.", "Paris is the capital of France.", "Cats purr."]}).json()
    assert [x["index"] for x in r["results"]][0] == 1 and len(r["results"]) == 2
    assert r["results"][0]["document"]["text"] == "Paris is the capital of France."
    assert r["usage"]["total_tokens"] > 0


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "param"), [
    ({"model": "smol", "messages": CAPITAL, "temperature": 5}, "temperature"),
    ({"model": "smol", "messages": CAPITAL, "n": 2}, "n"),
    ({"model": "smol", "messages": []}, "messages"),
    ({"model": "smol", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": "smol", "messages": CAPITAL, "tool_choice": "required"}, "tool_choice"),
    ({"model": "smol", "messages": CAPITAL, "response_format": {"type": "yaml"}}, "response_format"),
    ({"model": "smol", "messages": CAPITAL, "top_p": float("nan")}, None),
])
def test_bad_chat_requests_are_400(front: Front, body: dict[str, Any], param: str | None) -> None:
    content = json.dumps(body).replace("NaN", "NaN")
    r = httpx.post(front.url + "/v1/chat/completions", headers={**auth(), "Content-Type": "application/json"},
                   content=content)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_error_statuses(client: Any, front: Front) -> None:
    r = httpx.post(front.url + "/v1/chat/completions", headers={**auth(), "Content-Type": "application/json"},
                   content=b"{not json")
    assert r.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=CAPITAL)
    with pytest.raises(openai.InternalServerError) as exc:  # 503: the backend cannot load its model
        client.chat.completions.create(model="broken", messages=CAPITAL)
    assert exc.value.status_code == 503 and "model file not found" in str(exc.value)
    r = httpx.post(front.url + "/v1/embeddings", headers=auth(), json={"model": "echo", "input": "x"})
    assert r.status_code == 501 and "does not support Embedding" in r.json()["error"]["message"]
    r = httpx.post(front.url + "/v1/completions", headers=auth(),
                   json={"model": "smol", "prompt": "x", "max_tokens": 1, "grammar": "root ::= ("})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_argument"


def test_queue_full_is_429(front: Front) -> None:
    body = {"model": "one-slot", "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True,
            "temperature": 0, "stream": True}

    async def extra(h: httpx.AsyncClient) -> httpx.Response:
        return await h.post(front.url + "/v1/completions", headers=auth(),
                            json={"model": "one-slot", "prompt": "Hi", "max_tokens": 2})

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as h:
            async with h.stream("POST", front.url + "/v1/completions", headers=auth(), json=body) as running:
                assert running.status_code == 200
                async for line in running.aiter_lines():
                    if line.startswith("data: "):
                        break  # the only slot is generating; three more requests find no room
                return list(await asyncio.gather(*(extra(h) for _ in range(3))))

    replies = asyncio.run(scenario())
    refused = [r for r in replies if r.status_code == 429]
    assert refused, [(r.status_code, r.text[:200]) for r in replies]
    err = refused[0].json()["error"]
    assert err["type"] == "rate_limit_error" and "retry later" in err["message"]
    front.run(front.manager.stop("one-slot"))


def test_rpc_status_map_to_http() -> None:
    import grpc

    from inferd.client import RpcError
    from inferd.http.errors import from_rpc_error

    assert from_rpc_error(RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")).status == 429
    assert from_rpc_error(RpcError(grpc.StatusCode.UNAVAILABLE, "gone")).status == 503
    assert from_rpc_error(RpcError(grpc.StatusCode.INVALID_ARGUMENT, "Tokens: must be >= 0")).param == "Tokens"


# ---- disconnect, concurrency, metrics --------------------------------------------------------------
def test_client_disconnect_cancels_generation(front: Front) -> None:
    body = {"model": "smol", "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", front.url + "/v1/completions", headers=auth(),
                                                  json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk arrived: the generation runs; now hang up
    control = front.run(front.manager.client("smol"))

    def active() -> int:
        reply = front.run(control.get_metrics(timeout=5))
        return json.loads(reply.prompt_json_for_slot)["active"]

    deadline = time.monotonic() + 10
    while active() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert active() == 0  # stopped long before 4000 tokens


def test_concurrent_streams(front: Front) -> None:
    async def one(h: httpx.AsyncClient, i: int) -> str:
        body = {"model": "echo", "prompt": f"slow:0.01 hello number {i}", "stream": True, "max_tokens": 8}
        text = ""
        async with h.stream("POST", front.url + "/v1/completions", headers=auth(), json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"] if json.loads(line[6:])["choices"] else ""
        return text

    async def many() -> list[str]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as h:
            return await asyncio.gather(*(one(h, i) for i in range(32)))

    texts = asyncio.run(many())
    assert texts == [f"hello number {i} " for i in range(32)]


def test_correlation_id_reaches_the_backend_log(front: Front) -> None:
    r = httpx.post(front.url + "/v1/completions", headers={**auth(), "X-Request-Id": "req-7f3a"},
                   json={"model": "echo", "prompt": "correlate me"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-7f3a" and r.json()["id"] == "cmpl-req-7f3a"
    log = Path(front.manager.log_dir) / "echo.log"
    deadline = time.monotonic() + 5
    lines: list[dict[str, Any]] = []
    while not lines and time.monotonic() < deadline:
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{") and "req-7f3a" in x]
        time.sleep(0.05)
    assert lines and lines[0]["rpc"] == "Predict" and lines[0]["correlation_id"] == "req-7f3a"


def test_metrics_endpoint(front: Front, client: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="smol", messages=CAPITAL, temperature=0, max_tokens=4)
    text = httpx.get(front.url + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(name: str, **labels: str) -> float:
        return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab))

    assert value("inferd_requests_total", front="http", method="/v1/chat/completions", code="200") >= 1
    assert value("inferd_requests_total", front="http", code="401") >= 1
    assert value("inferd_request_duration_seconds_count", front="http", method="/v1/chat/completions") >= 1
    assert value("inferd_generated_tokens_total", front="http", model="smol") >= 4
    assert value("inferd_prompt_tokens_total", front="http", model="smol") > 0
    assert value("inferd_time_to_first_token_seconds_count", front="http", model="smol") >= 1
    assert value("inferd_generation_tokens_per_second", front="http", model="smol") > 0
    assert value("inferd_supervisor_model_state", model="smol", state="ready") == 1
    assert value("inferd_supervisor_model_state", model="broken", state="failed") == 1
    assert value("inferd_supervisor_backend_resident_memory_bytes", model="smol") > 50e6
    assert value("process_resident_memory_bytes") > 0


# ---- the CLI -----------------------------------------------------------------------------------------
def test_inferd_up_http_prints_the_address_and_serves(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(textwrap.dedent(f"""
        http: 127.0.0.1:0
        models:
          - name: echo
            backend: {ECHO}
            model: test-model
            env: {{PYTHONPATH: {ROOT}}}
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRPC_API_KEY": KEY}
    metrics_port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "inferd.cli", "up", str(tmp_path / "models.yaml"), "--lazy",
                           "--run-dir", str(tmp_path / "run"), "--metrics-port", str(metrics_port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        assert up.stdout is not None
        line = ""
        for _ in range(20):
            line = up.stdout.readline()
            if line.startswith("inferd: http on "):
                break
        address = line.removeprefix("inferd: http on ").strip()
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        oa = openai.OpenAI(base_url=f"http://{address}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in oa.models.list().data] == ["echo"]
        r = oa.completions.create(model="echo", prompt="started on demand")
        assert r.choices[0].text == "started on demand"
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text  # the supervisor's own port
        states = {s.labels["state"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                  if s.name == "inferd_supervisor_model_state" and s.labels["model"] == "echo"}
        assert states["ready"] == 1 and states["stopped"] == 0
    finally:
        up.terminate()
        assert up.wait(timeout=30) == 0
