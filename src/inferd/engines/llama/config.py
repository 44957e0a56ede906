"""What a llama.cpp model load is given, and the checks made before llama.cpp sees it.

Configuration comes in as plain keyword arguments (``ModelConfig``): the backend maps
ModelOptions onto it, benchmarks and tests build it directly. ``check_gguf`` and
``parse_override`` turn a bad path or ``Overrides`` entry into a ``ModelLoadError`` that says
why, before llama.cpp prints a cryptic one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import llama_cpp

from inferd.engines.gguf import GGUF_MAGIC, file_magic


class ModelLoadError(Exception):
    """The model or one of its parts (LoRA, context) could not be loaded; message says why."""


def default_threads() -> int:
    """Threads llama-server would use: every core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class ModelConfig:
    """Everything needed to load a model; plain values, defaults = llama-server's."""

    path: str
    n_ctx: int = 4096
    n_batch: int = 2048
    n_ubatch: int = 512
    slots: int = 4
    threads: int = 0  # 0: default_threads()
    threads_batch: int = 0  # 0: same as threads
    n_gpu_layers: int = 0
    main_gpu: int = 0
    use_mmap: bool = True
    use_mlock: bool = False
    flash_attn: str = "auto"
    cache_type_k: str = ""
    cache_type_v: str = ""
    offload_kqv: bool = True
    rope_freq_base: float = 0.0
    rope_freq_scale: float = 0.0
    rope_scaling: str = ""
    yarn_ext_factor: float = -1.0
    yarn_attn_factor: float = -1.0
    yarn_beta_fast: float = -1.0
    yarn_beta_slow: float = -1.0
    yarn_orig_ctx: int = 0
    # False (default): one KV stream per slot: batch-invariant greedy output and the fastest
    # layout at 4-8 streams (docs/llama-cpp.md, "KV layout"). True: one buffer for all slots:
    # prefix sharing is free (cells tagged, not copied), a greedy reply may differ by a near-tie
    # token with what else runs, and each token attends every slot's cells (slower at 8 streams).
    kv_unified: bool = False
    swa_full: bool = True
    embeddings: bool = False  # create the embedding context at load instead of lazily
    lora: list[tuple[str, float]] = field(default_factory=list)
    kv_overrides: list[str] = field(default_factory=list)  # llama.cpp --override-kv syntax
    seed: int = -1  # default sampling seed for requests that give none


def check_gguf(path: str) -> None:
    """Raise ModelLoadError with a clear reason before llama.cpp prints a cryptic one."""
    if not path:
        raise ModelLoadError("no model file given")
    if not os.path.exists(path):
        raise ModelLoadError(f"model file not found: {path}")
    if not os.path.isfile(path):
        raise ModelLoadError(f"model path is not a file: {path}")
    try:
        magic = file_magic(path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")


def parse_override(spec: str) -> llama_cpp.llama_model_kv_override:
    """``key=type:value`` (type int, float, bool, str), as llama.cpp's --override-kv."""
    key, sep, rest = spec.partition("=")
    kind, sep2, value = rest.partition(":")
    if not sep or not sep2 or not key:
        raise ModelLoadError(f"Overrides: {spec!r} is not KEY=TYPE:VALUE")
    ov = llama_cpp.llama_model_kv_override()
    if len(key.encode()) >= 128:
        raise ModelLoadError(f"Overrides: key too long: {key!r}")
    ov.key = key.encode()
    try:
        if kind == "int":
            ov.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            ov.value.val_i64 = int(value)
        elif kind == "float":
            ov.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT
            ov.value.val_f64 = float(value)
        elif kind == "bool":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            ov.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL
            ov.value.val_bool = value.lower() in ("true", "1")
        elif kind == "str":
            if len(value.encode()) >= 128:
                raise ValueError("string longer than 127 bytes")
            ov.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            ov.value.val_str = value.encode()
        else:
            raise ModelLoadError(f"Overrides: unknown type {kind!r} in {spec!r} (int, float, bool, str)")
    except ValueError as exc:
        raise ModelLoadError(f"Overrides: bad value in {spec!r}: {exc}") from None
    return ov
