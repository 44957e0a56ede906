"""Request preparation: prompt | tokens | chat -> prompt tokens + final sampling params.

This is the blocking part of a request (template rendering, tokenization, logit-bias texts,
JSON-schema -> GBNF conversion; the grammar itself is compiled when the scheduler builds the
sampler chain), so ``AsyncLlamaEngine`` runs it on a worker thread, never on the event loop
(issue 10, defect 3: one slow grammar used to stall every stream and Health).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

from inferd.engines.llama.chat_template import ChatTemplate, prompt_opens_thinking
from inferd.engines.llama.grammars import response_format_grammar, schema_to_gbnf, tool_call_grammar
from inferd.engines.llama.inputs import Chat
from inferd.engines.llama.model import LlamaModel
from inferd.engines.llama.sampling import SamplingParams
from inferd.errors import InvalidArgument

PromptInput = str | list[int] | Chat


@dataclass
class ChatSetup:
    """What the output parser of a chat request needs."""

    tools_enabled: bool
    thinking: bool
    id_salt: str


@dataclass
class Prepared:
    tokens: list[int]
    params: SamplingParams
    chat: ChatSetup | None


def tools_after_choice(tools: list[dict[str, Any]] | None,
                       choice: str | dict[str, Any] | None) -> tuple[list[dict[str, Any]] | None, str]:
    """Apply ``tool_choice``: (tools the template sees, forcing mode "" | "required" | "named")."""
    if tools is not None and not isinstance(tools, list):
        raise InvalidArgument("must be a JSON array of tools", "tools")
    if not tools:
        if choice not in (None, "", "auto", "none"):
            raise InvalidArgument("forces a tool call but no tools were given", "tool_choice")
        return None, ""
    if choice in (None, "", "auto"):
        return tools, ""
    if choice == "none":
        return None, ""
    if choice == "required":
        return tools, "required"
    if isinstance(choice, dict):
        fn = choice.get("function") if isinstance(choice.get("function"), dict) else choice
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidArgument('must name a function: {"type": "function", "function": {"name": ...}}',
                                  "tool_choice")
        kept = [t for t in tools if isinstance(t, dict) and (t.get("function") or t).get("name") == name]
        if not kept:
            raise InvalidArgument(f"names tool {name!r}, which is not in tools", "tool_choice")
        return kept, "named"
    raise InvalidArgument(f"must be auto, none, required or a function object, got {choice!r}", "tool_choice")


def _resolve_logit_bias(model: LlamaModel, bias: dict[int | str, float]) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in bias.items():
        if isinstance(key, int):
            if not 0 <= key < model.n_vocab:
                raise InvalidArgument(f"token id {key} is outside the vocabulary (0..{model.n_vocab - 1})",
                                      "logit_bias")
            out[key] = value
        else:
            for t in model.tokenize(key, add_special=False, parse_special=True):
                out[t] = value
    return out


def prepare(model: LlamaModel, template: ChatTemplate, prompt: PromptInput, params: SamplingParams) -> Prepared:
    """Validate and resolve one request (blocking; see module docstring).

    ``params`` is not modified: the returned copy carries the chat template's stop strings,
    the GBNF of a JSON schema / response_format / forced tool choice, and integer logit-bias keys.
    """
    params.validate()
    params = dataclasses.replace(params, stop=[s for s in params.stop if s], logit_bias=dict(params.logit_bias))
    grammar = params.grammar
    if params.json_schema is not None:
        grammar = schema_to_gbnf(params.json_schema, "json_schema")
    elif params.response_format is not None:
        grammar = response_format_grammar(params.response_format)
    chat: ChatSetup | None = None
    if isinstance(prompt, Chat):
        if not prompt.messages:
            raise InvalidArgument("a chat needs at least one message", "messages")
        tools, forcing = tools_after_choice(prompt.tools, prompt.tool_choice)
        if forcing and not grammar:
            grammar = tool_call_grammar(tools or [], single=forcing == "named")
        try:
            text = template.render(
                prompt.messages, tools=tools, add_generation_prompt=True, enable_thinking=prompt.enable_thinking,
                bos_token=model.bos_text, eos_token=model.eos_text,
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc), "messages") from None
        for s in template.stop_strings:
            if s not in params.stop:
                params.stop.append(s)
        chat = ChatSetup(tools_enabled=bool(tools), thinking=prompt_opens_thinking(text),
                         id_salt=prompt.id_salt or uuid.uuid4().hex)
        add_bos = model.add_bos and not (model.bos_text and text.startswith(model.bos_text))
        tokens = model.tokenize(text, add_special=add_bos, parse_special=True)
    elif isinstance(prompt, str):
        tokens = model.tokenize(prompt, add_special=True, parse_special=True)
    else:
        tokens = [int(t) for t in prompt]
        bad = [t for t in tokens if not 0 <= t < model.n_vocab]
        if bad:
            raise InvalidArgument(f"token ids outside the vocabulary (0..{model.n_vocab - 1}): {bad[:5]}", "prompt")
    if not tokens:
        raise InvalidArgument("the prompt is empty", "prompt")
    params.grammar = grammar
    params.json_schema = params.response_format = None
    params.logit_bias = _resolve_logit_bias(model, params.logit_bias)  # type: ignore[assignment]
    return Prepared(tokens, params, chat)
