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
from dataclasses import dataclass
from pathlib import Path

from inferd.errors import InvalidArgument, NotFound


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


@dataclass(frozen=True)
class ModelLocation:
    """Where LoadModel's fields point: the first candidate that exists, and everything tried.

    ``path`` is None when nothing named exists (or nothing was named: ``requested`` is then
    False and the caller uses its packaged default). ``tried`` lists each candidate with why
    it did not match, so a "not found" error can say what to fix.
    """

    path: Path | None
    tried: tuple[str, ...] = ()
    requested: bool = True

    def reason(self) -> str:
        return "; ".join(self.tried) or "no model was named"


def resolve_model_location(model: str = "", model_file: str = "", model_path: str = "",
                           models_dir: str | os.PathLike[str] | None = None) -> ModelLocation:
    """THE model-location rule for every backend (LocalAI's three ways of naming a model).

    Precedence, first existing candidate wins:

    1. ``ModelFile`` (LocalAI sends the full path here);
    2. ``ModelPath``/``Model`` when ``Model`` is relative (LocalAI: ModelPath is its models
       directory and Model the file name inside it);
    3. ``Model`` as a path of its own (relative to ``INFERD_MODELS_DIR`` when that is set,
       else to the working directory).

    With ``models_dir`` (``INFERD_MODELS_DIR``) set, EVERY candidate goes through
    ``confine``: one that resolves outside the root (``..``, an absolute path elsewhere, a
    symlink out) raises ``InvalidArgument`` naming the field, even if a later candidate
    would have matched, so an escape attempt is never silently replaced by another file.
    Candidates that exist can be files or directories; callers decide what they need.
    Nothing here falls back to a packaged model: that is each backend's own default.
    """
    if not model and not model_file:
        return ModelLocation(None, (), requested=False)
    tried: list[str] = []
    candidates: list[tuple[str, str]] = []
    if model_file:
        candidates.append(("ModelFile", model_file))
    if model and model_path and not os.path.isabs(model):
        candidates.append(("ModelPath/Model", os.path.join(model_path, model)))
    if model:
        candidates.append(("Model", model))
    for field, raw in candidates:
        path = confine(raw, models_dir, field)
        if path.exists():
            return ModelLocation(path, tuple(tried))
        tried.append(f"{field} {str(path)!r} does not exist")
    return ModelLocation(None, tuple(tried))


def writable_file(raw: str, root: str | os.PathLike[str] | None, field: str,
                  root_name: str = "INFERD_MODELS_DIR") -> Path:
    """A file a request asks the server to write (a PNG, a WAV): confined, not a directory, parent exists.

    Empty -> InvalidArgument; a directory -> InvalidArgument; a missing parent directory ->
    NotFound (the server never creates directories for a client).
    """
    if not raw:
        raise InvalidArgument("no output path given", field)
    path = confine(raw, root, field, root_name)
    if path.is_dir():
        raise InvalidArgument(f"{str(path)!r} is a directory; name a file to write", field)
    if not path.parent.is_dir():
        raise NotFound(f"{field}: directory {str(path.parent)!r} does not exist")
    return path
