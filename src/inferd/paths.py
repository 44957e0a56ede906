"""Confining user-supplied paths to a root directory (``INFERD_MODELS_DIR``, ``INFERD_AUDIO_DIR``).

A request may name files (ModelFile, LoraAdapter, a dataset, a TTS ``dst``). When the
operator sets a root, every such path must resolve inside it: ``..`` segments, absolute
paths elsewhere and symlinks pointing out are all refused with ``InvalidArgument``
naming the field and the root, so a client cannot read or write arbitrary files. Without
a root, paths are taken as given (LocalAI's behaviour).

Resolution follows symlinks (``os.path.realpath``) on both sides, so a symlink inside the
root that points outside it is caught, and a root that is itself a symlink still works.
"""

from __future__ import annotations

import os
from pathlib import Path

from inferd.errors import InvalidArgument


def confine(path: str | os.PathLike[str], root: str | os.PathLike[str] | None, field: str,
            root_name: str = "INFERD_MODELS_DIR") -> Path:
    """Return ``path`` resolved; with a ``root``, refuse it unless it lies inside the root.

    A relative ``path`` is taken relative to the root when one is set (so LocalAI's
    "file name relative to the models directory" works), else to the working directory.
    """
    text = os.fspath(path)
    if "\x00" in text:
        raise InvalidArgument("path contains a NUL byte", field)
    if not root:
        return Path(text).expanduser()
    real_root = Path(os.path.realpath(os.fspath(root)))
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = real_root / candidate
    resolved = Path(os.path.realpath(candidate))
    if resolved != real_root and real_root not in resolved.parents:
        raise InvalidArgument(
            f"{text!r} resolves to {str(resolved)!r}, outside {root_name} ({str(real_root)!r}); "
            f"use a path inside that directory", field)
    return resolved


def is_within(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """True when ``path`` (symlinks followed) lies inside ``root``."""
    real_root = Path(os.path.realpath(os.fspath(root)))
    resolved = Path(os.path.realpath(os.fspath(path)))
    return resolved == real_root or real_root in resolved.parents
