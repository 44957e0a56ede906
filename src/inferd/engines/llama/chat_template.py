"""Render a model's own chat template (Jinja2, sandboxed), the way HuggingFace and llama.cpp do.

Why this module exists: LocalAI sends chat messages with ``UseTokenizerTemplate`` and an empty
prompt, so the backend must turn messages into the exact prompt text the model was trained on.
That text is defined by the Jinja template stored in the GGUF (``tokenizer.chat_template``).
The template comes from a file we did not write, so it runs in Jinja's immutable sandbox: it can
read the values we pass, never Python internals, and cannot mutate them.

Where the template comes from (``ChatTemplate.source``):

* ``"load-option"``: a template string given at LoadModel wins, so a user can fix a bad template;
* ``"gguf"``: the model's own ``tokenizer.chat_template``;
* ``"default"``: ``DEFAULT_TEMPLATE`` (ChatML), for base models such as gemma3-270m that have none.

Templates that know nothing about tools (SmolLM2's, the default) still get tools: ``render``
applies the same kind of "polyfill" llama.cpp's minja does, in the format SmolLM2 was trained on
(tool list in the system prompt inside ``<tools>``, calls as ``<tool_call>[...]</tool_call>``,
results as a user turn inside ``<tool_response>``). ``tool_parser`` reads that format back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from inferd.errors import InvalidArgument
from inferd.limits import parse_json

GGUF_TEMPLATE_KEY = "tokenizer.chat_template"
# Some GGUFs (Hermes, Command-R) ship a second template meant for requests that carry tools;
# llama.cpp prefers it when tools are given, and so do we.
GGUF_TOOL_TEMPLATE_KEY = "tokenizer.chat_template.tool_use"

# ChatML: the most widely trained turn format; with no template at all, a base model still sees
# clear turn boundaries. The engine should stop on the markers in ``ChatTemplate.stop_strings``.
DEFAULT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# End-of-turn markers a template may use. Stopping on them matters when the marker is not an
# end-of-generation token in the vocabulary (the default ChatML on gemma, say); llama.cpp already
# stops on real EOG tokens. ``<|im_start|>`` catches a ChatML model that starts the next turn itself.
_TURN_MARKERS = ("<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")
_THINKING_HINTS = ("enable_thinking", "<think>", "reasoning_content")
_TOOLS_VAR = re.compile(r"\btools\b")


class TemplateRaised(ValueError):
    """The template itself called ``raise_exception`` (e.g. "roles must alternate")."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """HF's override of Jinja's ``tojson``: plain JSON, non-ASCII kept, no HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """Accept HF's ``{% generation %}...{% endgeneration %}`` (training masks) as a no-op wrapper."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, failing loudly on unsafe access instead of rendering nothing.

    The stock sandbox turns ``x.__class__`` into an undefined value that prints as ``""``; nothing
    leaks, but a template probing Python internals should fail, not render a subtly wrong prompt.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _environment() -> ImmutableSandboxedEnvironment:
    """The environment HF's ``apply_chat_template`` uses, so templates behave as their authors tested."""
    env = _StrictSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _compile(env: ImmutableSandboxedEnvironment, text: str, what: str) -> jinja2.Template:
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"{what} chat template does not compile: {exc.message} (line {exc.lineno})") from exc


@dataclass
class ChatTemplate:
    """A compiled chat template plus what the engine needs to know about it."""

    source: str
    text: str
    tool_text: str | None = None
    _template: jinja2.Template = field(init=False, repr=False)
    _tool_template: jinja2.Template | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        env = _environment()
        self._template = _compile(env, self.text, self.source)
        if self.tool_text:
            self._tool_template = _compile(env, self.tool_text, f"{self.source} tool_use")

    @classmethod
    def from_model(cls, metadata: Mapping[str, str], override: str | None = None) -> ChatTemplate:
        """Pick the template: the load option, else the GGUF's, else ``DEFAULT_TEMPLATE``.

        Raises ValueError if the chosen template does not compile (better at load than per request).
        """
        if override:
            return cls(source="load-option", text=override)
        if metadata.get(GGUF_TEMPLATE_KEY):
            return cls(source="gguf", text=metadata[GGUF_TEMPLATE_KEY],
                       tool_text=metadata.get(GGUF_TOOL_TEMPLATE_KEY) or None)
        return cls(source="default", text=DEFAULT_TEMPLATE)

    @property
    def supports_thinking(self) -> bool:
        """The template handles reasoning (``enable_thinking``, ``<think>``, ``reasoning_content``)."""
        return any(hint in self.text for hint in _THINKING_HINTS)

    @property
    def supports_tools(self) -> bool:
        """The template renders ``tools`` itself; if not, ``render`` polyfills tools (see module doc)."""
        return bool(_TOOLS_VAR.search(self.tool_text or self.text))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """End-of-turn markers this template writes: stop strings the engine should add."""
        return tuple(m for m in _TURN_MARKERS if m in self.text)

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        bos_token: str = "",
        eos_token: str = "",
    ) -> str:
        """Render ``messages`` (OpenAI/HF shape, see ``messages_from_proto_fields``) to a prompt.

        ``enable_thinking`` is passed only when not None, so templates keep their own default.
        ``bos_token``/``eos_token`` are the vocabulary's texts for those tokens; templates that
        write ``{{ bos_token }}`` need them. Raises ValueError on any template failure.
        """
        template = self._template
        if tools and self._tool_template is not None:
            template = self._tool_template
        if not self.supports_tools:
            messages = _polyfill_tools(messages, tools)
            tools = None
        context: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": bos_token,
            "eos_token": eos_token,
        }
        if tools:
            context["tools"] = tools
        if enable_thinking is not None:
            context["enable_thinking"] = enable_thinking
        try:
            return template.render(**context)
        except TemplateRaised as exc:
            raise ValueError(f"chat template ({self.source}) refused the messages: {exc}") from exc
        except SecurityError as exc:
            raise ValueError(f"chat template ({self.source}) attempted an unsafe operation: {exc}") from exc
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as exc:
            raise ValueError(f"chat template ({self.source}) failed: {type(exc).__name__}: {exc}") from exc


def prompt_opens_thinking(prompt: str) -> bool:
    """True when the rendered prompt ends inside an open ``<think>`` block.

    Templates such as DeepSeek-R1's end the generation prompt with ``<think>``: the model's output
    then starts as reasoning, and the output parser must be told (``ChatOutputParser(thinking=True)``).
    """
    return prompt.rstrip().endswith("<think>")


def _tool_call_json(calls: list[dict[str, Any]]) -> str:
    """Assistant tool calls as ``<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>``."""
    flat = []
    for call in calls:
        fn = call.get("function", call)
        flat.append({"name": fn.get("name", ""), "arguments": fn.get("arguments", {})})
    return "<tool_call>" + json.dumps(flat, ensure_ascii=False) + "</tool_call>"


_TOOL_PROMPT = (
    "You can call functions. These are available, as JSON schemas:\n"
    "<tools>{tools}</tools>\n"
    "To call one or more of them, reply with only this, and no other text:\n"
    '<tool_call>[{{"name": "function_name", "arguments": {{"argument": "value"}}}}]</tool_call>\n'
    "If no function fits the request, answer normally."
)


def _polyfill_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Express tools, tool calls and tool results as plain turns, for templates that ignore them.

    Same idea as llama.cpp's minja polyfills; the format is the one SmolLM2 was trained on.
    Returns new dicts: the caller's messages are never modified.
    """
    out = []
    for msg in messages:
        msg = dict(msg)
        if msg.get("tool_calls"):
            msg["content"] = (msg.get("content") or "") + _tool_call_json(msg.pop("tool_calls"))
        if msg.get("role") == "tool":
            msg = {"role": "user", "content": f"<tool_response>\n{msg.get('content') or ''}\n</tool_response>"}
        out.append(msg)
    if tools:
        schemas = [t.get("function", t) for t in tools]
        prompt = _TOOL_PROMPT.format(tools=json.dumps(schemas, ensure_ascii=False))
        if out and out[0].get("role") == "system":
            out[0]["content"] = f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _parse_tool_calls(raw: Any, position: int) -> list[dict[str, Any]]:
    """LocalAI's ``Message.tool_calls`` JSON string -> OpenAI-shaped list with dict arguments.

    HF templates (Qwen, Hermes, Llama 3.1) write ``arguments | tojson``: a dict renders as the JSON
    object the model was trained on, while a string would be double-encoded. So arguments that are
    a JSON-object string become a dict (llama.cpp's minja does the same for such templates).
    """
    try:
        value = parse_json(raw, f"messages[{position}].tool_calls") if isinstance(raw, str) else raw
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None
    calls = [value] if isinstance(value, dict) else value
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise ValueError(f"messages[{position}].tool_calls must be a JSON list of objects")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call.get("function"), dict) else call
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                parsed = parse_json(args, "arguments") if args.strip() else {}
            except InvalidArgument:
                parsed = args
            args = parsed if isinstance(parsed, dict) else args
        entry: dict[str, Any] = {"type": "function", "function": {"name": fn.get("name", ""), "arguments": args}}
        if call.get("id"):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def messages_from_proto_fields(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LocalAI ``Message`` fields (as dicts) -> the message dicts chat templates expect.

    ``role`` and ``content`` are always present (content ``""`` rather than missing, so templates
    that concatenate it work); ``name``, ``tool_call_id`` and ``reasoning_content`` only when
    non-empty, because templates test ``is defined`` / truthiness; ``tool_calls`` (a JSON string on
    the wire; an already decoded list is accepted too) becomes a list. Raises ValueError on a missing role or malformed tool_calls.
    """
    messages = []
    for i, item in enumerate(items):
        role = item.get("role") or ""
        if not role:
            raise ValueError(f"messages[{i}].role is empty")
        msg: dict[str, Any] = {"role": role, "content": item.get("content") or ""}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if item.get(key):
                msg[key] = item[key]
        raw_calls = item.get("tool_calls")
        if raw_calls and (not isinstance(raw_calls, str) or raw_calls.strip()):
            msg["tool_calls"] = _parse_tool_calls(raw_calls, i)
        messages.append(msg)
    return messages
