"""Turn raw model output into LocalAI's structured chat deltas: content, reasoning, tool calls.

Why: LocalAI expects a backend to return what the model *meant*, in ``Reply.chat_deltas``: the
visible answer (``content``), the model's reasoning (``reasoning_content``) and tool calls with
a name and JSON arguments. Models write all of that as plain text with markup, and each family
uses its own; this module recognises the common ones:

* reasoning: ``<think>...</think>`` at the start of the output; with ``thinking=True`` the prompt
  already opened ``<think>`` (see ``chat_template.prompt_opens_thinking``) so output starts inside;
* tool calls, only when ``tools_enabled``:
  Hermes/Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (an object or a list,
  one or several blocks; SmolLM2 writes a list), Mistral ``[TOOL_CALLS][{...}]``, Llama 3
  ``<|python_tag|>{"name": ..., "parameters": {...}}``, ``<function=NAME>{json}</function>``, and
  a bare JSON object or list of ``{"name": ..., "arguments"|"parameters": ...}`` that opens the
  answer (small models often drop the tags).

Streaming: text arrives in arbitrary pieces, so a marker can be split across ``feed`` calls. The
parser holds back only what could still be the start of a marker (or an unfinished tool call) and
decides once the text settles it, so the concatenated deltas never depend on how the text was cut:
``parse_full(text)`` equals the merge of ``feed`` over any split plus ``finish()``. Anything that
turns out not to be a valid tool call goes back out as content, markup included: no text is lost.

Whitespace: reasoning is trimmed; whitespace after ``</think>`` or after a tool call, and
whitespace-only content before the first tool call, are dropped (they separate blocks; they are
not part of the answer). Without tools, content after any reasoning is passed through unchanged.

Tool calls are emitted once, whole (id, name and complete arguments in one ``ToolCallDelta``);
LocalAI's accumulator (id and name from the first delta, arguments concatenated) handles that.
Ids are deterministic: ``call_<index>_<8 hex of sha256(id_salt, name, arguments)>``. Pass a
per-request ``id_salt`` to make ids unique across requests.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Tool-call openers -> the text that closes the block ("" = a single JSON value follows instead).
_CALL_MARKERS = {
    "<tool_call>": "</tool_call>",
    "<function=": "</function>",
    "[TOOL_CALLS]": "",
    "<|python_tag|>": "",
}
_BARE = ""  # kind of a bare JSON tool call (no marker)
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.:\-]+")


@dataclass
class ToolCallDelta:
    index: int
    id: str
    name: str
    arguments: str


@dataclass
class ChatDelta:
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


def _partial_suffix(text: str, markers: list[str]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of one of ``markers``."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


def _may_be_call_json(text: str) -> bool:
    """False once ``text`` (starting with ``{`` or ``[``) can no longer be a tool-call object/list.

    Lets an answer that merely starts with a bracket ("[1] ...") stream instead of waiting for a
    closing bracket that may never come.
    """
    rest = text.lstrip()
    if rest[:1] == "[":
        rest = rest[1:].lstrip()
        if rest and rest[0] != "{":
            return False
    if rest[:1] == "{":
        rest = rest[1:].lstrip()
        return not rest or rest[0] == '"'
    return not rest


class _JsonEnd:
    """Incrementally find where one JSON object/array ends (bracket depth, strings, escapes).

    Incremental so a long tool call costs O(length), not O(length^2) over many small feeds.
    """

    def __init__(self, start: int) -> None:
        self.pos, self.depth, self.in_string, self.escaped = start, 0, False, False

    def scan(self, text: str) -> int | None:
        for i in range(self.pos, len(text)):
            c = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
        self.pos = len(text)
        return None


def _calls_from_json(text: str, require_arguments: bool) -> list[tuple[str, str]] | None:
    """``(name, arguments JSON)`` pairs if ``text`` is a tool-call object or non-empty list, else None."""
    try:
        value: Any = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return None
        if isinstance(item.get("function"), dict):  # OpenAI shape
            item = item["function"]
        name = item.get("name")
        if not isinstance(name, str) or not name:
            return None
        key = "arguments" if "arguments" in item else "parameters" if "parameters" in item else None
        if key is None and require_arguments:
            return None
        args = item.get(key) if key else None
        if args is None:
            args = {}
        calls.append((name, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    return calls or None


def _calls_from_block(kind: str, body: str) -> list[tuple[str, str]] | None:
    """Parse the text between an opening marker and its end (or the end of output)."""
    if kind == "<function=":
        name, sep, args = body.partition(">")
        name = name.strip()
        if not sep or not _FUNCTION_NAME.fullmatch(name):
            return None
        args = args.strip() or "{}"
        try:
            value = json.loads(args)
        except json.JSONDecodeError:
            return None
        return [(name, json.dumps(value, ensure_ascii=False))] if isinstance(value, dict) else None
    return _calls_from_json(body.strip(), require_arguments=kind == _BARE)


class ChatOutputParser:
    """Incremental parser: ``feed`` pieces of generated text, then ``finish`` once at the end."""

    def __init__(self, tools_enabled: bool, thinking: bool = False, id_salt: str = "") -> None:
        self._tools = tools_enabled
        self._thinking = thinking
        self._salt = id_salt
        self._buf = ""
        self._state = "start"  # start | reasoning | content | call
        self._skip_ws = False  # drop whitespace before the next text (after </think> or a call)
        self._content_start = True  # a bare JSON tool call may only open the answer
        self._said = False  # visible content emitted (whitespace before it is dropped before a call)
        self._kind = ""  # current call's opening marker (_BARE for a bare JSON call)
        self._prefix = ""  # text given back as content if the current call turns out invalid
        self._find_from = 0  # where to resume looking for the current block's end marker
        self._json: _JsonEnd | None = None
        self._index = 0
        self._out: list[ChatDelta] = []

    def feed(self, text: str) -> list[ChatDelta]:
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[ChatDelta]:
        """Flush what was held back; an unfinished tool call that does not parse becomes content."""
        self._run(final=True)
        return self._take()

    # -- output -----------------------------------------------------------------------------

    def _content(self, text: str) -> None:
        if text:
            self._out.append(ChatDelta(content=text))
            self._said = self._said or bool(text.strip())

    def _reasoning(self, text: str) -> None:
        if text:
            self._out.append(ChatDelta(reasoning_content=text))

    def _calls(self, calls: list[tuple[str, str]]) -> None:
        deltas = []
        for name, arguments in calls:
            digest = hashlib.sha256(f"{self._salt}\0{name}\0{arguments}".encode()).hexdigest()[:8]
            deltas.append(ToolCallDelta(self._index, f"call_{self._index}_{digest}", name, arguments))
            self._index += 1
        self._out.append(ChatDelta(tool_calls=deltas))
        self._skip_ws = True

    def _take(self) -> list[ChatDelta]:
        """Return this step's deltas, merging neighbours of the same kind into one."""
        merged: list[ChatDelta] = []
        for d in self._out:
            last = merged[-1] if merged else None
            if last and d.content and last.content and not last.tool_calls:
                last.content += d.content
            elif last and d.reasoning_content and last.reasoning_content and not last.tool_calls:
                last.reasoning_content += d.reasoning_content
            else:
                merged.append(d)
        self._out = []
        return merged

    # -- state machine ----------------------------------------------------------------------

    def _run(self, final: bool) -> None:
        step = {"start": self._start, "reasoning": self._reason, "content": self._scan_content,
                "call": self._call}
        while step[self._state](final):
            pass

    def _start(self, final: bool) -> bool:
        """Decide whether the output opens with ``<think>`` (each step returns: keep going?)."""
        head = self._buf.lstrip()
        if head.startswith(THINK_OPEN):
            self._buf = head[len(THINK_OPEN):]
            self._state, self._skip_ws = "reasoning", True
            return True
        if not final and THINK_OPEN.startswith(head):
            return False  # empty, whitespace or a partial "<think>": wait
        if self._thinking:
            self._state, self._skip_ws = "reasoning", True
        else:
            self._state = "content"
        return True

    def _reason(self, final: bool) -> bool:
        if self._skip_ws:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._skip_ws = False
        end = self._buf.find(THINK_CLOSE)
        if end >= 0:
            self._reasoning(self._buf[:end].rstrip())
            self._buf = self._buf[end + len(THINK_CLOSE):]
            self._state, self._skip_ws, self._content_start = "content", True, True
            return True
        if final:
            self._reasoning(self._buf.rstrip())
            self._buf = ""
            return False
        # Hold a partial "</think>" and trailing whitespace (trimmed if "</think>" follows).
        safe = self._buf[: len(self._buf) - _partial_suffix(self._buf, [THINK_CLOSE])]
        cut = len(safe.rstrip())
        self._reasoning(self._buf[:cut])
        self._buf = self._buf[cut:]
        return False

    def _scan_content(self, final: bool) -> bool:
        if self._skip_ws:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._skip_ws = False
        if not self._tools:
            self._content(self._buf)
            self._buf = ""
            return False
        if self._content_start:
            head = self._buf.lstrip()
            if not head and not final:
                return False
            self._content_start = False
            if head[:1] in ("{", "["):
                self._open_call(_BARE, prefix=self._buf[: len(self._buf) - len(head)])
                self._buf = head
                return True
        hits = [(i, m) for m in _CALL_MARKERS if (i := self._buf.find(m)) >= 0]
        if hits:
            i, marker = min(hits)
            before = self._buf[:i]
            kept = before if (self._said or before.strip()) else ""
            self._content(kept)
            self._buf = self._buf[i + len(marker):]
            # The whitespace before the marker goes back out too if the call does not parse.
            self._open_call(marker, prefix=before[len(kept):] + marker)
            return True
        if final:
            self._content(self._buf)
            self._buf = ""
            return False
        # Hold a partial marker, and leading whitespace (dropped if a tool call follows).
        safe = self._buf[: len(self._buf) - _partial_suffix(self._buf, list(_CALL_MARKERS))]
        cut = len(safe) if (self._said or safe.strip()) else 0
        self._content(self._buf[:cut])
        self._buf = self._buf[cut:]
        return False

    def _open_call(self, kind: str, prefix: str) -> None:
        self._state, self._kind, self._prefix = "call", kind, prefix
        self._find_from, self._json = 0, None

    def _close_call(self, calls: list[tuple[str, str]] | None, raw: str, rest: str) -> bool:
        """End the current block: tool calls if it parsed, else its raw text back as content."""
        if calls:
            self._calls(calls)
        else:
            self._content(self._prefix + raw)
        self._buf, self._state = rest, "content"
        return True

    def _call(self, final: bool) -> bool:
        end_marker = _CALL_MARKERS.get(self._kind, "")
        if end_marker:
            end = self._buf.find(end_marker, self._find_from)
            if end < 0:
                if not final:
                    self._find_from = max(0, len(self._buf) - len(end_marker) + 1)
                    return False
                return self._close_call(_calls_from_block(self._kind, self._buf), self._buf, "")
            body = self._buf[:end]
            raw = body + end_marker
            return self._close_call(_calls_from_block(self._kind, body), raw, self._buf[len(raw):])
        # A single JSON value follows the marker (or is the whole call, for a bare one).
        head = self._buf.lstrip()
        if not head:
            return self._close_call(None, self._buf, "") if final else False
        if head[0] not in "{[" or not _may_be_call_json(head):
            return self._close_call(None, "", self._buf)
        if self._json is None:
            self._json = _JsonEnd(len(self._buf) - len(head))
        end = self._json.scan(self._buf)
        if end is None:
            return self._close_call(None, self._buf, "") if final else False
        raw = self._buf[:end]
        calls = _calls_from_block(self._kind, raw)
        return self._close_call(calls, raw, self._buf[end:])


def parse_full(text: str, tools_enabled: bool, thinking: bool = False, id_salt: str = "") -> ChatDelta:
    """Parse a complete (non-streamed) reply into one merged ``ChatDelta``."""
    parser = ChatOutputParser(tools_enabled, thinking, id_salt)
    merged = ChatDelta()
    for delta in parser.feed(text) + parser.finish():
        merged.content += delta.content
        merged.reasoning_content += delta.reasoning_content
        merged.tool_calls.extend(delta.tool_calls)
    return merged
