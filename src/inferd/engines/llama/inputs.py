"""The engine API's plain types: what a front passes in (``Chat``) and gets out (outputs, results).

Fronts (the LocalAI backend, LLMService, the OpenAI HTTP front) build these from their own
wire types; nothing here knows protobuf or HTTP. Field names follow OpenAI's chat API, so an
HTTP front passes its JSON through almost unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inferd.engines.llama.tool_parser import ChatDelta


@dataclass
class Chat:
    """A chat request: rendered with the model's chat template, output parsed into deltas.

    ``messages``: OpenAI/HF message dicts (``role``, ``content``, optional ``name``,
    ``tool_call_id``, ``reasoning_content``, ``tool_calls`` with dict arguments).
    ``tools``: OpenAI tool definitions. ``tool_choice``: ``"auto"`` (default: the model
    decides), ``"none"`` (tools dropped), ``"required"`` (the output is constrained to one or
    more calls of the tools) or ``{"type": "function", "function": {"name": X}}`` (constrained
    to one call of X). ``enable_thinking``: passed to the template when not None.
    ``id_salt``: makes tool-call ids unique per request (default: random).
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    enable_thinking: bool | None = None
    id_salt: str = ""


@dataclass
class GenerationOutput:
    """One streamed piece of a generation.

    ``text`` is the new text (whole UTF-8 characters, stop strings never included);
    ``chat_deltas`` its parsed form for a ``Chat`` request (content / reasoning / tool calls;
    may be empty while the parser holds text back). ``finish_reason`` is set on the last
    output only: ``"stop"`` or ``"length"`` (errors and cancellation raise instead).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    generated_tokens: int
    logprobs: list[dict[str, Any]] | None = None
    chat_deltas: list[ChatDelta] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache (last output only)
    prompt_seconds: float = 0.0  # admission to first token (last output only)
    generation_seconds: float = 0.0  # first token to last (last output only)


@dataclass
class GenerationResult:
    """A whole generation (``AsyncLlamaEngine.complete``)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    logprobs: list[dict[str, Any]] | None = None
    chat: ChatDelta | None = None  # the parsed reply of a Chat request
    cached_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
