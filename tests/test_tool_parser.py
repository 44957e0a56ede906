"""Model output -> chat deltas: every tool-call format, reasoning, fallbacks, and split-invariance."""

from __future__ import annotations

import json
import random

import pytest

from inferd.engines.llama.tool_parser import ChatDelta, ChatOutputParser, ToolCallDelta, parse_full


def merge(deltas: list[ChatDelta]) -> ChatDelta:
    out = ChatDelta()
    for d in deltas:
        out.content += d.content
        out.reasoning_content += d.reasoning_content
        out.tool_calls.extend(d.tool_calls)
    return out


def stream(pieces: list[str], tools: bool, thinking: bool = False) -> ChatDelta:
    parser = ChatOutputParser(tools, thinking)
    deltas: list[ChatDelta] = []
    for piece in pieces:
        deltas += parser.feed(piece)
    return merge(deltas + parser.finish())


def calls(delta: ChatDelta) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in delta.tool_calls]


# -- formats ---------------------------------------------------------------------------------


def test_hermes_single_and_several_blocks() -> None:
    text = (
        'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>'
    )
    out = parse_full(text, tools_enabled=True)
    assert out.content == "Let me check. "
    assert calls(out) == [("get_weather", {"city": "Rome"}), ("get_time", {"tz": "CET"})]
    assert [c.index for c in out.tool_calls] == [0, 1]


def test_smollm2_list_inside_tool_call() -> None:
    text = '<tool_call>[\n{"name": "add", "arguments": {"a": 1, "b": 2}},\n{"name": "neg", "arguments": {"x": 3}}\n]</tool_call>'
    out = parse_full(text, tools_enabled=True)
    assert out.content == ""
    assert calls(out) == [("add", {"a": 1, "b": 2}), ("neg", {"x": 3})]


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '  [{"name": "get_weather", "parameters": {"city": "Paris"}}]',
        '{"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}',
    ],
)
def test_bare_json_call(text: str) -> None:
    out = parse_full(text, tools_enabled=True)
    assert (out.content, calls(out)) == ("", [("get_weather", {"city": "Paris"})])


def test_brackets_and_quotes_inside_strings() -> None:
    text = '{"name": "f", "arguments": {"q": "a \\" } ] b", "r": "\\\\"}}'
    assert calls(parse_full(text, True)) == [("f", {"q": 'a " } ] b', "r": "\\"})]


def test_mistral_llama3_and_function_tag() -> None:
    mistral = parse_full('[TOOL_CALLS][{"name": "f", "arguments": {"q": "x"}}, {"name": "g", "arguments": {}}]', True)
    assert calls(mistral) == [("f", {"q": "x"}), ("g", {})]
    llama = parse_full('<|python_tag|>{"name": "search", "parameters": {"query": "ü"}}', True)
    assert calls(llama) == [("search", {"query": "ü"})]
    assert llama.tool_calls[0].arguments == '{"query": "ü"}'  # a JSON string, non-ASCII kept
    fn = parse_full('Sure.<function=lookup>{"id": 7}</function>', True)
    assert (fn.content, calls(fn)) == ("Sure.", [("lookup", {"id": 7})])


def test_arguments_always_a_json_string() -> None:
    out = parse_full('<tool_call>{"name": "f"}</tool_call>', True)
    assert out.tool_calls[0].arguments == "{}"
    out = parse_full('<tool_call>{"name": "f", "arguments": {"n": [1, 2]}}</tool_call>', True)
    assert isinstance(out.tool_calls[0].arguments, str)
    assert json.loads(out.tool_calls[0].arguments) == {"n": [1, 2]}


def test_ids_deterministic_unique_and_salted() -> None:
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "f", "arguments": {}}</tool_call>'
    a, b = parse_full(text, True), parse_full(text, True)
    ids = [c.id for c in a.tool_calls]
    assert ids == [c.id for c in b.tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith(f"call_{n}_") for n, i in enumerate(ids))
    salted = parse_full(text, True, id_salt="request-2")
    assert [c.id for c in salted.tool_calls] != ids


# -- reasoning -------------------------------------------------------------------------------


def test_think_block_is_reasoning() -> None:
    out = parse_full("<think>\nThe user wants X.\n</think>\n\nHere is X.", tools_enabled=False)
    assert (out.reasoning_content, out.content) == ("The user wants X.", "Here is X.")


def test_prompt_opened_think() -> None:
    out = parse_full("Step 1, step 2.</think>Answer.", tools_enabled=False, thinking=True)
    assert (out.reasoning_content, out.content) == ("Step 1, step 2.", "Answer.")
    # A model that repeats the opening tag anyway.
    out = parse_full("<think>Hmm.</think>Answer.", tools_enabled=False, thinking=True)
    assert (out.reasoning_content, out.content) == ("Hmm.", "Answer.")
    # Never closed: it was all reasoning (llama.cpp does the same).
    out = parse_full("still thinking", tools_enabled=False, thinking=True)
    assert (out.reasoning_content, out.content) == ("still thinking", "")


def test_reasoning_then_tool_call() -> None:
    text = '<think>Need weather.</think>\n<tool_call>{"name": "w", "arguments": {"c": "Oslo"}}</tool_call>'
    out = parse_full(text, tools_enabled=True)
    assert (out.reasoning_content, out.content, calls(out)) == ("Need weather.", "", [("w", {"c": "Oslo"})])


def test_think_later_in_the_output_is_content() -> None:
    text = "I wrote <think> in my answer"
    assert parse_full(text, tools_enabled=False).content == text


def test_reasoning_streams_before_the_block_closes() -> None:
    parser = ChatOutputParser(tools_enabled=False, thinking=True)
    got = merge(parser.feed("Let me think about it"))
    assert got.reasoning_content == "Let me think about it" and got.content == ""


# -- no tools: everything is content ---------------------------------------------------------


def test_tools_disabled_keeps_markup_as_content() -> None:
    text = 'Call <tool_call>{"name": "f", "arguments": {}}</tool_call> and {"name": "g", "arguments": {}}'
    out = parse_full(text, tools_enabled=False)
    assert (out.content, out.tool_calls) == (text, [])
    bare = '{"name": "g", "arguments": {}}'
    assert parse_full(bare, tools_enabled=False).content == bare
    out = parse_full('<think>r</think><tool_call>{"name": "f"}</tool_call>', tools_enabled=False)
    assert (out.reasoning_content, out.content) == ("r", '<tool_call>{"name": "f"}</tool_call>')


# -- malformed calls fall back to content -----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        "<tool_call>[]</tool_call>",
        '<tool_call>{"name": "f", "argu',  # cut off by the token limit
        "[TOOL_CALLS] sorry, no tool fits",
        '[TOOL_CALLS]{"name": "f", "arguments": {}',
        "<|python_tag|>print('hi')",
        '<function=bad name>{"a": 1}</function>',
        "<function=f>not json</function>",
        '{"name": "Alice", "age": 3}',  # JSON answer, not a call (no arguments)
        "[1, 2, 3] are the numbers",
        "{curly} start",
    ],
)
def test_malformed_calls_are_content(text: str) -> None:
    out = parse_full(text, tools_enabled=True)
    assert (out.content, out.tool_calls) == (text, [])


def test_whitespace_before_a_failed_call_is_kept() -> None:
    text = "Answer:\n <tool_call>oops</tool_call> end"
    assert parse_full(text, True).content == text


def test_unterminated_but_valid_call_is_a_call() -> None:
    out = parse_full('<tool_call>{"name": "f", "arguments": {"x": 1}}', True)
    assert calls(out) == [("f", {"x": 1})]


# -- streaming --------------------------------------------------------------------------------


def test_partial_marker_is_held_back_then_decided() -> None:
    parser = ChatOutputParser(tools_enabled=True)
    first = merge(parser.feed("Hello <tool"))
    assert first.content == "Hello " and not first.tool_calls
    second = merge(parser.feed('_call>{"name": "f", "arguments": {}}</tool'))
    assert second == ChatDelta()
    third = merge(parser.feed("_call>"))
    assert [c.name for c in third.tool_calls] == ["f"]  # emitted as soon as the block closes
    assert parser.finish() == []
    # A "<" that turns out not to be a marker is released, not lost.
    parser = ChatOutputParser(tools_enabled=True)
    assert merge(parser.feed("a <")).content == "a "
    assert merge(parser.feed("b")).content == "<b"


def test_tool_call_delta_is_whole() -> None:
    parser = ChatOutputParser(tools_enabled=True)
    deltas = parser.feed('<tool_call>{"name": "f", "arguments": {"k": "v"}}</tool_call>') + parser.finish()
    assert deltas == [ChatDelta(tool_calls=[ToolCallDelta(0, deltas[0].tool_calls[0].id, "f", '{"k": "v"}')])]


CORPUS = [
    "Plain answer with <b>html</b> and [brackets] and {braces}.",
    " leading and trailing space \n",
    "<think>\nThinking hard.\n</think>\n\nThe answer is 42.",
    "part of reasoning</think>answer",
    "<thi",
    "<think>never closed",
    'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
    '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": {"s": "}{]["}}</tool_call> done',
    '<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}]</tool_call>',
    '\n{"name": "f", "arguments": {"q": "say \\"hi\\" </tool_call>"}}',
    '{"name": "f", "arguments": {"q": "a \\" } ] b", "r": "\\\\"}} tail',
    '[{"name": "f", "parameters": {"x": [1, {"y": 2}]}}, {"name": "g", "arguments": {}}] trailing',
    '[TOOL_CALLS][{"name": "f", "arguments": {"é": "ñ"}}]',
    '<|python_tag|>{"name": "search", "parameters": {"query": "x"}}',
    'Before <function=lookup>{"id": 7}</function> after',
    "<tool_call>{not json}</tool_call> then text",
    '<tool_call>{"name": "f", "argu',
    "[TOOL_CALLS] nothing",
    "[1] citation then <tool_call>",
    "{curly} then <|python_tag|>code()",
    '<think>why</think> {"name": "f", "arguments": {}}',
    "emoji 😀 and 中文 < > [ ] {",
]
FLAGS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("tools,thinking", FLAGS)
def test_every_two_way_split_matches_parse_full(tools: bool, thinking: bool) -> None:
    for text in CORPUS:
        expected = parse_full(text, tools, thinking)
        for cut in range(len(text) + 1):
            assert stream([text[:cut], text[cut:]], tools, thinking) == expected, (text, cut)
        assert stream(list(text), tools, thinking) == expected, text


@pytest.mark.parametrize("tools,thinking", FLAGS)
def test_random_splits_match_parse_full(tools: bool, thinking: bool) -> None:
    rng = random.Random(1234)
    for text in CORPUS:
        expected = parse_full(text, tools, thinking)
        for _ in range(40):
            cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 8))))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            assert "".join(pieces) == text
            assert stream(pieces, tools, thinking) == expected, (text, pieces)


def test_plain_text_passes_through_unchanged() -> None:
    for text in CORPUS:
        if not text.lstrip().startswith("<thi"):
            assert parse_full(text, tools_enabled=False).content == text
