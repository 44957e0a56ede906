"""``AsyncLlamaEngine``: the async API every front uses, and its prefix cache.

Real generations on the packaged SmolLM2-135M-Instruct (Threads 1), default layout
(one KV stream per slot, prefix cache on) unless a test says otherwise; the prefix cache
tests run with both KV layouts (their cache placement and copying differ).
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from inferd.engines.llama import (  # noqa: E402
    AsyncLlamaEngine,
    Chat,
    ModelConfig,
    SamplingParams,
    default_model_path,
)
from inferd.engines.llama import engine as engine_module  # noqa: E402
from inferd.errors import FailedPrecondition, InvalidArgument  # noqa: E402
from tests.llama_support import SMOL_SYSTEM, WEATHER_SCHEMA  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string"}, "utc": {"type": "boolean"}},
             "required": ["zone", "utc"]}}}]
# ~1,500 tokens of history, as in the multi-turn case (scaled down where noted)
HISTORY = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(60))


def load(**kw) -> AsyncLlamaEngine:
    kw.setdefault("n_ctx", 1024)
    kw.setdefault("slots", 4)
    kw.setdefault("threads", 1)
    cache = kw.pop("cache_tokens", None)
    return AsyncLlamaEngine.load(ModelConfig(path=default_model_path(), **kw), cache_tokens=cache)


@pytest.fixture(scope="module")
def engine():
    e = load()
    yield e
    e.close()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def user(text: str, system: str = SMOL_SYSTEM) -> Chat:
    return Chat([{"role": "system", "content": system}, {"role": "user", "content": text}])


async def test_generate_takes_text_tokens_or_chat(engine) -> None:
    chat = user("What is the capital of France?")
    result = await engine.complete(chat, greedy(12))
    assert result.text and result.chat is not None and result.chat.content == result.text
    tokens = engine.tokenize(engine.render_chat(chat), add_special=False)
    from_tokens = await engine.complete(tokens, greedy(12, stop=["<|im_end|>"]))
    from_text = await engine.complete(engine.render_chat(chat), greedy(12, stop=["<|im_end|>"]))
    assert from_tokens.text == from_text.text == result.text
    pieces = [o async for o in engine.generate(chat, greedy(12))]
    assert "".join(o.text for o in pieces) == result.text
    assert pieces[-1].finish_reason in ("stop", "length") and all(o.finish_reason is None for o in pieces[:-1])
    assert "".join(d.content for o in pieces for d in o.chat_deltas) == result.text


@pytest.mark.parametrize("choice, names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
])
async def test_forced_tool_choice_returns_calls_matching_the_schema(engine, choice, names) -> None:
    chat = Chat([{"role": "user", "content": "What time is it in Tokyo?"}], tools=TOOLS, tool_choice=choice)
    result = await engine.complete(chat, greedy(80))
    calls = result.chat.tool_calls
    assert calls, result.text
    for call in calls:
        assert call.name in names
        args = json.loads(call.arguments)
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.name)
        assert set(args) == set(schema["required"])
        for key, spec in schema["properties"].items():
            assert isinstance(args[key], {"string": str, "boolean": bool}[spec["type"]])
    if isinstance(choice, dict):
        assert len(calls) == 1


async def test_tool_choice_auto_leaves_it_to_the_model(engine) -> None:
    chat = Chat([{"role": "user", "content": "Say hello."}], tools=TOOLS, tool_choice="auto")
    result = await engine.complete(chat, greedy(16))
    assert result.text  # no grammar: whatever the model chose, it was not constrained to a call
    with pytest.raises(InvalidArgument, match="tool_choice"):
        await engine.complete(Chat([{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="sometimes"),
                              greedy(2))


@pytest.mark.parametrize("fmt, check", [
    ({"type": "json_object"}, lambda v: isinstance(v, dict)),
    ({"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"]}}}, lambda v: isinstance(v["name"], str) and isinstance(v["age"], int)),
])
async def test_response_format_constrains_to_json(engine, fmt, check) -> None:
    result = await engine.complete(user("Describe a person as JSON."), greedy(60, response_format=fmt))
    assert check(json.loads(result.text)), result.text


async def test_preparation_runs_off_the_event_loop(engine, monkeypatch) -> None:
    loop_thread = threading.current_thread()
    seen: list[threading.Thread] = []
    real = engine_module.prepare

    def spy(*args, **kwargs):
        seen.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "prepare", spy)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    await engine.complete(user("Hi"), greedy(4, json_schema=schema))
    assert seen and all(t is not loop_thread for t in seen)


async def test_bad_params_name_the_engine_field(engine) -> None:
    for params, field in ((SamplingParams(top_p=2.0), "top_p"), (SamplingParams(temperature=float("nan")),
                          "temperature"), (SamplingParams(grammar="root ::= ("), "grammar"),
                          (SamplingParams(logit_bias={10**9: 1.0}), "logit_bias")):
        with pytest.raises(InvalidArgument) as info:
            await engine.complete("hi", params)
        assert info.value.field == field


# ---- prefix cache ---------------------------------------------------------------------------
LAYOUTS = pytest.mark.parametrize("unified", [False, True], ids=["separate", "unified"])


@LAYOUTS
async def test_second_turn_reuses_the_first_and_output_is_unchanged(unified) -> None:
    cached, uncached = load(kv_unified=unified), load(kv_unified=unified, cache_tokens=0)
    try:
        turn1 = [{"role": "system", "content": HISTORY}, {"role": "user", "content": "Is 7 odd?"}]
        first = await cached.complete(Chat(turn1), greedy(12))
        turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And 8?"}]
        second = await cached.complete(Chat(turn2), greedy(12))
        assert first.cached_tokens == 0
        assert second.cached_tokens >= first.prompt_tokens - 2  # turn 1's prompt (+ reply) reused
        # a cache hit never changes output: the same turn without any cache
        assert (await uncached.complete(Chat(turn2), greedy(12))).text == second.text
        again = await cached.complete(Chat(turn2), greedy(12))  # full hit: only the last token decoded
        assert again.cached_tokens == again.prompt_tokens - 1 and again.text == second.text
        assert uncached.stats()["cache_hits"] == 0
    finally:
        cached.close()
        uncached.close()


@LAYOUTS
async def test_shared_system_prompt_is_processed_once_across_concurrent_requests(unified) -> None:
    e = load(kv_unified=unified)
    try:
        questions = ["Is 3 odd?", "Is 4 even?", "Is 10 odd?", "Is 11 even?"]
        chats = [Chat([{"role": "system", "content": HISTORY}, {"role": "user", "content": q}]) for q in questions]
        shared = len(e.tokenize(e.render_chat(chats[0]), add_special=False))
        before = e.stats()["prompt_tokens_processed"]
        results = await asyncio.gather(*(e.complete(c, greedy(4)) for c in chats))
        processed = e.stats()["prompt_tokens_processed"] - before
        assert sum(r.cached_tokens for r in results) >= 3 * (shared - 20)
        assert processed < shared + 3 * 40  # once, plus each request's own question
    finally:
        e.close()


@LAYOUTS
async def test_cache_bound_evicts_least_recently_used(unified) -> None:
    e = load(kv_unified=unified, cache_tokens=200)
    try:
        a, b = "Apples. " + HISTORY[:300], "Bananas! " + HISTORY[300:600]  # no common prefix
        assert 100 < len(e.tokenize(a)) < 198 and 100 < len(e.tokenize(b)) < 198
        await e.complete(a, greedy(2))
        await e.complete(b, greedy(2))  # together past 200 cached tokens: a's cache goes
        stats = e.stats()
        assert stats["cache_evictions"] >= 1 and stats["cache_tokens"] <= 200
        assert (await e.complete(b, greedy(2))).cached_tokens > 0  # the recent one survived
        assert (await e.complete(a, greedy(2))).cached_tokens == 0  # the old one did not
    finally:
        e.close()


# ---- life cycle -----------------------------------------------------------------------------
async def test_close_waits_for_preparation_and_ends_streams_cleanly(monkeypatch) -> None:
    e = load(slots=1)
    entered, release = threading.Event(), threading.Event()
    real = engine_module.prepare

    def slow(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    stream = e.generate("Once upon a time", greedy(2000, ignore_eos=True))
    first = await stream.__anext__()
    assert first.text
    monkeypatch.setattr(engine_module, "prepare", slow)
    pending = asyncio.ensure_future(e.complete("hello", greedy(2)))
    await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
    closer = asyncio.get_running_loop().run_in_executor(None, e.close)
    await asyncio.sleep(0.3)
    assert not closer.done()  # the model is in use by the preparation: close waits
    release.set()
    await closer
    with pytest.raises(FailedPrecondition):
        await pending
    with pytest.raises(FailedPrecondition):
        async for _ in stream:
            pass
    with pytest.raises(FailedPrecondition):
        await e.complete("hi", greedy(2))
