"""GBNF grammars built from JSON: a JSON-schema ``Grammar``, a forced tool choice, ``response_format``.

Why here and not in a front: every front (LocalAI's PredictOptions, the OpenAI HTTP API, seed
002's service) expresses "the output must be this JSON" differently, but llama.cpp constrains
generation one way only, with a GBNF grammar in the sampler chain. The conversion itself is
llama.cpp's own ``json-schema-to-grammar`` (llama-cpp-python ships the Python port,
``llama_cpp.llama_grammar.json_schema_to_gbnf``); documents are parsed with
``inferd.limits.parse_json`` first, so a hostile schema is refused with INVALID_ARGUMENT naming
the field instead of a RecursionError deep in the converter.

Forced tool calls (``tool_choice`` ``"required"`` or a named function) are written in the
``<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>`` shape: the one the tool polyfill
teaches models without a tool template (SmolLM2 was trained on it) and one that
``tool_parser`` recognises for every model family, so the call always comes back parsed.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf

from inferd.errors import InvalidArgument
from inferd.limits import parse_json

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_ROOT_RULE = re.compile(r"^root\s*::=", re.MULTILINE)


def schema_to_gbnf(schema: Any, field: str, prop_order: list[str] | None = None) -> str:
    """A parsed JSON schema -> GBNF (root rule ``root``); converter failures name ``field``."""
    if not isinstance(schema, (dict, bool)):
        raise InvalidArgument("a JSON schema must be an object", field)
    try:
        return json_schema_to_gbnf(json.dumps(schema), prop_order=prop_order)
    except RecursionError:
        raise InvalidArgument("the JSON schema nests too deeply to convert", field) from None
    except Exception as exc:  # noqa: BLE001 - the converter raises assorted errors
        raise InvalidArgument(f"cannot convert the JSON schema to a grammar: {exc}", field) from None


def grammar_from_field(raw: str, field: str = "Grammar") -> str:
    """A ``Grammar`` value: GBNF as is; text starting with ``{`` is a JSON schema, converted."""
    text = raw.strip()
    if not text:
        return ""
    if text.startswith("{"):
        return schema_to_gbnf(parse_json(text, field), field)
    return raw


def _rename_root(gbnf: str, name: str) -> str:
    if not _ROOT_RULE.search(gbnf):
        raise InvalidArgument("the converted grammar has no root rule", "ToolChoice")
    return _ROOT_RULE.sub(f"{name} ::=", gbnf)


def tool_call_grammar(tools: list[dict[str, Any]], single: bool) -> str:
    """GBNF forcing ``<tool_call>[...]</tool_call>`` whose calls match the tools' schemas.

    ``single``: exactly one call (a named ``tool_choice``); else one or more (``"required"``).
    Each call is ``{"name": <one of the tools>, "arguments": <that tool's parameters schema>}``.
    """
    variants = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidArgument(f"tool {i} has no function name", "Tools")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object"}
        if not isinstance(params, dict):
            raise InvalidArgument(f"tool {fn['name']!r}: parameters must be a JSON schema object", "Tools")
        variants.append({
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    if not variants:
        raise InvalidArgument("a forced tool choice needs at least one tool", "ToolChoice")
    item = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if single:
        schema["maxItems"] = 1
    calls = _rename_root(schema_to_gbnf(schema, "Tools", prop_order=["name", "arguments"]), "tool-calls")
    return f"root ::= {json.dumps(TOOL_CALL_OPEN)} tool-calls {json.dumps(TOOL_CALL_CLOSE)}\n{calls}"


def response_format_grammar(response_format: dict[str, Any] | None) -> str:
    """OpenAI ``response_format`` -> GBNF ("" for text / none).

    ``{"type": "json_object"}``: any JSON object; ``{"type": "json_schema", "json_schema":
    {"schema": {...}}}``: that schema (the ``schema`` member may also be given directly).
    """
    if not response_format:
        return ""
    if not isinstance(response_format, dict):
        raise InvalidArgument("must be an object with a 'type'", "response_format")
    kind = response_format.get("type", "text")
    if kind == "text":
        return ""
    if kind == "json_object":
        return schema_to_gbnf({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", spec) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidArgument("json_schema.schema must be a JSON schema object", "response_format")
        return schema_to_gbnf(schema, "response_format")
    raise InvalidArgument(f"unknown type {kind!r} (text, json_object, json_schema)", "response_format")
