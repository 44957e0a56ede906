"""Bounds on sizes that come from requests: thread counts, context sizes, JSON documents.

Hostile or mistaken input (``Threads: 1000000``, a LogitBias of 50,000 ``[``) must get a
precise ``InvalidArgument`` naming the field and the bound, never a hang, a
``RecursionError`` or an INTERNAL. Every backend uses these helpers, so the bounds and
their messages are the same everywhere.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from inferd.errors import InvalidArgument

#: Threads a request may ask for: generous (oversubscription is the user's call) but finite.
MAX_THREADS = max(64, 8 * (os.cpu_count() or 1))
#: Largest JSON document accepted in a request field (LogitBias, Tools, Options, Metadata...).
MAX_JSON_BYTES = 1 << 20
#: Deepest nesting accepted in such a document.
MAX_JSON_DEPTH = 64
#: Largest batch a backend may be configured to run in one forward pass (``max_batch``...).
MAX_BATCH = 4096
#: Most items (documents to rerank, texts to embed) one request may carry: each costs a
#: forward pass that cannot be interrupted, so an unbounded list would hold the engine for
#: minutes and block Free/LoadModel's drain.
MAX_ITEMS = 16384


def bounded_int(value: int | float, field: str, minimum: int, maximum: int) -> int:
    """Return ``value`` as int if ``minimum <= value <= maximum``; else InvalidArgument with the bound."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"must be a finite number between {minimum} and {maximum}, got {value}", field)
    n = int(value)
    if n < minimum or n > maximum:
        raise InvalidArgument(f"must be between {minimum} and {maximum}, got {n}", field)
    return n


def thread_count(value: int, field: str = "Threads", default: int | None = None) -> int:
    """A thread count from a request: 0 or negative means ``default`` (or the CPU count)."""
    if value <= 0:
        return default if default is not None else (os.cpu_count() or 1)
    return bounded_int(value, field, 1, MAX_THREADS)


def finite_float(value: float, field: str, minimum: float | None = None,
                 maximum: float | None = None) -> float:
    """Refuse NaN/inf and values outside ``[minimum, maximum]`` with the bound in the message."""
    if not math.isfinite(value):
        raise InvalidArgument(f"must be a finite number, got {value}", field)
    if minimum is not None and value < minimum:
        raise InvalidArgument(f"must be >= {minimum}, got {value}", field)
    if maximum is not None and value > maximum:
        raise InvalidArgument(f"must be <= {maximum}, got {value}", field)
    return value


def json_depth_ok(text: str, max_depth: int) -> bool:
    """Whether ``text``'s bracket nesting stays within ``max_depth`` (strings skipped); O(n), no recursion."""
    depth = 0
    in_string = False
    escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def parse_json(text: str | bytes, field: str, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with a size and depth bound; any failure is InvalidArgument naming ``field``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", field) from None
    if len(text) > max_bytes:
        raise InvalidArgument(f"JSON is {len(text)} bytes; the limit is {max_bytes}", field)
    if not json_depth_ok(text, max_depth):
        raise InvalidArgument(f"JSON nests deeper than {max_depth} levels", field)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"invalid JSON: {exc}", field) from None
