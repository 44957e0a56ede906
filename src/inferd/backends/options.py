"""Parsing of ``ModelOptions.Options``: LocalAI's free-form ``"key:value"`` strings.

Every backend reads the same format (``key:value``, or ``key=value``), so the splitting
and the typed conversions live here once; each backend only decides which keys it knows.
A bad value fails the load with ``LoadError`` naming the option, so a typo in a model
config surfaces at LoadModel instead of as a silent default.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from inferd.errors import LoadError
from inferd.settings import FALSE_WORDS, TRUE_WORDS


def split_options(items: Iterable[str]) -> Iterator[tuple[str, str, str]]:
    """Yield ``(key, value, raw)`` per item: key lower-cased and stripped.

    The value is kept verbatim (a chat template's trailing space matters); the typed
    helpers below strip it themselves.
    """
    for raw in items:
        key, sep, value = raw.partition(":")
        if not sep:
            key, sep, value = raw.partition("=")
        yield key.strip().lower(), value, raw


def option_bool(key: str, value: str, empty: bool | None = None) -> bool:
    """``true/false/1/0/yes/no/on/off``; ``empty`` (if given) is the value of a bare key."""
    v = value.strip().lower()
    if v == "" and empty is not None:
        return empty
    if v in TRUE_WORDS:
        return True
    if v in FALSE_WORDS:
        return False
    raise LoadError(f"Options: {key} expects true/false, got {value!r}")


def option_int(key: str, value: str, minimum: int | None = None) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise LoadError(f"Options: {key} expects an integer, got {value!r}") from None
    if minimum is not None and n < minimum:
        raise LoadError(f"Options: {key} must be >= {minimum}, got {n}")
    return n


def option_float(key: str, value: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise LoadError(f"Options: {key} expects a number, got {value!r}") from None
