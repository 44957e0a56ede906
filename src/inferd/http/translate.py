"""OpenAI request bodies -> ``PredictOptions``, backend ``Reply`` -> OpenAI shapes.

Pure functions, no I/O: the routes call the backend, these functions only convert.
Everything the engine does (chat templates, tool-call parsing, grammars from JSON
schemas, forced tool choice) stays in the engine; the front forwards the fields:

* ``tools`` -> ``Tools`` (JSON), ``tool_choice`` -> ``ToolChoice`` ("auto", "none",
  "required" or the named-function object as JSON): the backend constrains a forced
  choice with a grammar built from the tools' schemas;
* ``response_format`` ``json_schema`` -> ``Grammar`` holding the schema (the backend
  turns a JSON schema into a grammar), ``json_object`` -> a schema for any object;
* ``logprobs``/``top_logprobs`` -> ``Logprobs``/``TopLogprobs``; ``stop`` ->
  ``StopPrompts``; ``max_tokens`` -> ``Tokens``; sampling fields one to one.
"""

from __future__ import annotations

import json
from typing import Any

from inferd.http.errors import bad_request
from inferd.http.schemas import MAX_STOPS, ChatCompletionRequest, CompletionRequest, SamplingFields
from inferd.proto import backend_pb2 as pb
from inferd.replies import finish_reason, text_delta

# OpenAI's documented defaults, used when a request leaves the field out.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS:
        raise bad_request(f"at most {MAX_STOPS} stop sequences, got {len(stops)}", "stop")
    return [s for s in stops if s]


def _sampling(body: SamplingFields, options: pb.PredictOptions) -> None:
    options.Temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    options.TopP = DEFAULT_TOP_P if body.top_p is None else body.top_p
    if body.seed is not None:
        options.Seed = body.seed
    if body.presence_penalty is not None:
        options.PresencePenalty = body.presence_penalty
    if body.frequency_penalty is not None:
        options.FrequencyPenalty = body.frequency_penalty
    if body.top_k is not None:
        options.TopK = body.top_k
    if body.min_p is not None:
        options.MinP = body.min_p
    if body.repeat_penalty is not None:
        options.Penalty = body.repeat_penalty
    if body.logit_bias:
        options.LogitBias = json.dumps(body.logit_bias)
    options.IgnoreEOS = body.ignore_eos
    options.StopPrompts.extend(_stops(body.stop))
    if body.grammar:
        options.Grammar = body.grammar


def _content_text(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or "type" not in part:
                raise bad_request("each content part must be an object with a 'type'", f"{where}.content[{i}]")
            if part["type"] == "text":
                texts.append(str(part.get("text", "")))
            else:
                raise bad_request(f"content part type {part['type']!r} is not supported (text only)",
                                  f"{where}.content[{i}]")
        return "".join(texts)
    raise bad_request("must be a string or a list of content parts", f"{where}.content")


def chat_messages(messages: list[dict[str, Any]]) -> list[pb.Message]:
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool", "function"):
            raise bad_request(f"unknown role {role!r}", f"{where}.role")
        msg = pb.Message(role="system" if role == "developer" else role,
                         content=_content_text(m.get("content"), where))
        for key in ("name", "tool_call_id", "reasoning_content"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise bad_request("must be a string", f"{where}.{key}")
                setattr(msg, key, m[key])
        if m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise bad_request("must be a list", f"{where}.tool_calls")
            msg.tool_calls = json.dumps(m["tool_calls"])
        out.append(msg)
    return out


def _response_format_grammar(fmt: dict[str, Any] | None) -> str:
    if not fmt:
        return ""
    kind = fmt.get("type")
    if kind in (None, "text"):
        return ""
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("json_schema.schema must be a JSON schema object", "response_format")
        return json.dumps(schema)
    raise bad_request(f"type {kind!r} is not one of text, json_object, json_schema", "response_format")


def _tool_choice(choice: str | dict[str, Any] | None, has_tools: bool) -> str:
    if choice is None:
        return ""
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise bad_request(f"must be 'auto', 'none', 'required' or a function object, got {choice!r}",
                              "tool_choice")
        if choice == "required" and not has_tools:
            raise bad_request("'required' needs 'tools'", "tool_choice")
        return choice
    name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
    if choice.get("type") != "function" or not name:
        raise bad_request("an object must be {'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if not has_tools:
        raise bad_request("names a function but 'tools' is empty", "tool_choice")
    return json.dumps({"type": "function", "function": {"name": name}})


def chat_options(body: ChatCompletionRequest, correlation_id: str) -> pb.PredictOptions:
    options = pb.PredictOptions(Messages=chat_messages(body.messages), UseTokenizerTemplate=True,
                                CorrelationId=correlation_id)
    _sampling(body, options)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    options.Tokens = max_tokens or 0
    if body.tools:
        for i, tool in enumerate(body.tools):
            if tool.get("type") != "function" or not isinstance(tool.get("function"), dict) \
                    or not tool["function"].get("name"):
                raise bad_request("each tool must be {'type': 'function', 'function': {'name': ...}}",
                                  f"tools[{i}]")
        options.Tools = json.dumps(body.tools)
    options.ToolChoice = _tool_choice(body.tool_choice, bool(body.tools))
    grammar = _response_format_grammar(body.response_format)
    if grammar:
        if body.grammar:
            raise bad_request("give either response_format or grammar, not both", "response_format")
        options.Grammar = grammar
    if body.logprobs:
        options.Logprobs = 1
        options.TopLogprobs = body.top_logprobs or 0
    elif body.top_logprobs:
        raise bad_request("needs logprobs: true", "top_logprobs")
    if body.reasoning_effort is not None:
        options.Metadata["enable_thinking"] = "false" if body.reasoning_effort in ("none", "minimal") else "true"
    return options


def completion_options(body: CompletionRequest, correlation_id: str) -> pb.PredictOptions:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise bad_request("one prompt per request (a list must hold exactly one string)", "prompt")
    if body.echo:
        raise bad_request("echo is not supported", "echo")
    if body.suffix:
        raise bad_request("suffix (fill-in-the-middle) is not supported", "suffix")
    options = pb.PredictOptions(Prompt=prompts[0], CorrelationId=correlation_id)
    _sampling(body, options)
    # OpenAI's legacy default for completions is 16 tokens.
    options.Tokens = 16 if body.max_tokens is None else body.max_tokens
    if body.logprobs:
        options.Logprobs = 1
        options.TopLogprobs = body.logprobs
    return options


# ---- replies -> OpenAI ------------------------------------------------------------------------
def reply_logprobs(reply: pb.Reply) -> dict[str, Any] | None:
    """The backend's logprobs (JSON, OpenAI chat shape) without the raw ``bytes`` lists kept."""
    if not reply.logprobs:
        return None
    try:
        data = json.loads(reply.logprobs)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def legacy_logprobs(chat: dict[str, Any] | None, offset: int = 0) -> dict[str, Any] | None:
    """Chat-shaped logprobs -> the completions API's tokens/token_logprobs/top_logprobs lists."""
    if not chat:
        return None
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in chat.get("content") or []:
        out["tokens"].append(entry.get("token", ""))
        out["token_logprobs"].append(entry.get("logprob"))
        out["top_logprobs"].append({t.get("token", ""): t.get("logprob") for t in entry.get("top_logprobs") or []})
        out["text_offset"].append(offset)
        offset += len(entry.get("token", ""))
    return out


def delta_of(reply: pb.Reply) -> tuple[str, str, list[dict[str, Any]]]:
    """(content, reasoning, OpenAI tool-call deltas) of one reply (see ``inferd.replies``)."""
    d = text_delta(reply)
    calls = []
    for tc in d.tool_calls:
        call: dict[str, Any] = {"index": tc.index}
        if tc.id:
            call["id"] = tc.id
            call["type"] = "function"
        fn: dict[str, str] = {"name": tc.name} if tc.name else {}
        fn["arguments"] = tc.arguments
        call["function"] = fn
        calls.append(call)
    return d.content, d.reasoning, calls


def merge_tool_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed tool-call deltas merged into complete calls (index order)."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        c = calls.setdefault(d["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        if d.get("id"):
            c["id"] = d["id"]
        fn = d.get("function") or {}
        if fn.get("name"):
            c["function"]["name"] = fn["name"]
        c["function"]["arguments"] += fn.get("arguments", "")
    return [calls[i] for i in sorted(calls)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


__all__ = ["chat_messages", "chat_options", "completion_options", "delta_of", "finish_reason",
           "legacy_logprobs", "merge_tool_calls", "reply_logprobs", "usage"]
