"""Reading a backend ``Reply`` the same way in every front (HTTP/OpenAI, seed 002's service).

A chat reply carries parsed ``chat_deltas`` (content, reasoning, tool-call chunks) beside
the raw text; a plain completion only the text. ``text_delta`` picks the right one, so
the fronts never re-parse model output themselves (that is the engine's job).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inferd.proto import backend_pb2 as pb


@dataclass
class ToolCallChunk:
    index: int
    id: str
    name: str
    arguments: str


@dataclass
class TextDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallChunk] = field(default_factory=list)


def text_delta(reply: pb.Reply) -> TextDelta:
    """The reply's content, reasoning and tool-call chunks; raw text when the backend did not parse."""
    if not reply.chat_deltas:
        return TextDelta(reply.message.decode("utf-8", "replace"))
    out = TextDelta()
    content, reasoning = [], []
    for d in reply.chat_deltas:
        content.append(d.content)
        reasoning.append(d.reasoning_content)
        out.tool_calls.extend(ToolCallChunk(tc.index, tc.id, tc.name, tc.arguments) for tc in d.tool_calls)
    out.content = "".join(content)
    out.reasoning = "".join(reasoning)
    return out


def finish_reason(generated: int, max_tokens: int, has_tool_calls: bool) -> str:
    """OpenAI's finish reason: tool_calls, length (the token budget ran out) or stop."""
    if has_tool_calls:
        return "tool_calls"
    if max_tokens and generated >= max_tokens:
        return "length"
    return "stop"
