"""Loading a GGUF model with llama.cpp's C API and owning its contexts.

``LlamaModel`` wraps the three native objects a generation needs (model, vocabulary,
context) and the small helpers around them (tokenize, token pieces, metadata,
embeddings). Configuration comes in as a ``ModelConfig`` (``config``).

Context parameters follow what llama-server sets, because those are the ones that
make multi-sequence decoding fast (see docs/llama-cpp.md): ``n_seq_max`` = slots,
one KV stream per slot (llama-server's layout with ``-np N``: each token attends only its
own sequence's cells, and a greedy reply does not depend on what else runs; the scheduler
keeps busy slots consecutive so one step stays one graph), ``n_batch`` 2048 /
``n_ubatch`` 512, flash attention "auto", and as many threads for decoding as for prompt
processing. ``kv_unified`` shares one buffer between the slots instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any

import llama_cpp
from llama_cpp import _logger as _llama_logger

from inferd.engines.llama.config import (
    ModelConfig,
    ModelLoadError,
    check_gguf,
    default_threads,
    parse_override,
)

log = logging.getLogger("inferd.engines.llama")

_backend_lock = threading.Lock()
_backend_ready = False

CACHE_TYPES: dict[str, int] = {
    "f32": llama_cpp.GGML_TYPE_F32,
    "f16": llama_cpp.GGML_TYPE_F16,
    "bf16": 30,  # GGML_TYPE_BF16 (not exported by the bindings)
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
    "q4_1": llama_cpp.GGML_TYPE_Q4_1,
    "iq4_nl": llama_cpp.GGML_TYPE_IQ4_NL,
    "q5_0": llama_cpp.GGML_TYPE_Q5_0,
    "q5_1": llama_cpp.GGML_TYPE_Q5_1,
}

ROPE_SCALING: dict[str, int] = {
    "": llama_cpp.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED,
    "none": llama_cpp.LLAMA_ROPE_SCALING_TYPE_NONE,
    "linear": llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR,
    "yarn": llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN,
    "longrope": llama_cpp.LLAMA_ROPE_SCALING_TYPE_LONGROPE,
}

FLASH_ATTN: dict[str, int] = {
    "": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "true": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "enabled": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    "false": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    "disabled": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


def _ensure_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            _llama_logger.set_verbose(False)
            llama_cpp.llama_backend_init()
            _backend_ready = True


class LlamaModel:
    """A loaded GGUF model with one generation context (``n_seq_max`` = slots).

    Not thread-safe by itself: the scheduler thread is the only user of ``ctx``
    while it runs; tokenize/metadata are read-only and safe from any thread.
    """

    def __init__(self, config: ModelConfig) -> None:
        _ensure_backend()
        check_gguf(config.path)
        self.config = config
        self.threads = config.threads or default_threads()
        self.threads_batch = config.threads_batch or self.threads
        self._keep: list[Any] = []  # ctypes objects the C side points into
        self._loras: list[Any] = []
        self.model: Any = None
        self.ctx: Any = None
        self._embd_ctx: Any = None
        self._embd_lock = threading.Lock()
        self._piece_cache: dict[int, bytes] = {}
        try:
            self._load_model()
            self._load_context()
            if config.embeddings:
                self.embedding_context()
        except BaseException:
            self.close()
            raise

    # ---- loading ------------------------------------------------------------------
    def _load_model(self) -> None:
        cfg = self.config
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = cfg.n_gpu_layers
        mp.main_gpu = cfg.main_gpu
        if cfg.use_mmap and cfg.use_mlock:
            mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK
        elif cfg.use_mmap:
            mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
        elif cfg.use_mlock:
            mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_MLOCK
        else:
            mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
        if cfg.kv_overrides:
            arr = (llama_cpp.llama_model_kv_override * (len(cfg.kv_overrides) + 1))()
            for i, spec in enumerate(cfg.kv_overrides):
                arr[i] = parse_override(spec)
            arr[len(cfg.kv_overrides)].key = b""  # terminator: empty key
            self._keep.append(arr)
            mp.kv_overrides = arr
        model = llama_cpp.llama_model_load_from_file(cfg.path.encode(), mp)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {cfg.path} (corrupt or unsupported GGUF)")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
        self.n_embd = llama_cpp.llama_model_n_embd(model)
        self.metadata = self._read_metadata()
        self.eog_tokens = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        self.bos_token = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos_token = llama_cpp.llama_vocab_eos(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos_text = self.token_text(self.bos_token)
        self.eos_text = self.token_text(self.eos_token)
        for path, scale in cfg.lora:
            check_file = path if os.path.isfile(path) else None
            if check_file is None:
                raise ModelLoadError(f"LoRA adapter not found: {path}")
            adapter = llama_cpp.llama_adapter_lora_init(model, path.encode())
            if not adapter:
                raise ModelLoadError(f"llama.cpp could not load LoRA adapter {path}")
            self._loras.append((adapter, scale))

    def _context_params(self, embeddings: bool) -> Any:
        cfg = self.config
        cp = llama_cpp.llama_context_default_params()
        n_ctx = cfg.n_ctx if cfg.n_ctx > 0 else min(self.n_ctx_train, 4096)
        self._n_ctx_request = n_ctx
        if not embeddings:
            # Room for every slot to use the full context: a request that fits a
            # single-slot server fits here. Separate (the default), each slot gets its own
            # stream of n_ctx cells, so batched results equal single-request results;
            # unified, the slots share these cells (and the prefix cache lives in them).
            n_ctx *= max(1, cfg.slots)
            self._check_kv_memory(n_ctx)
        cp.n_ctx = n_ctx
        cp.n_batch = max(1, min(cfg.n_batch, n_ctx)) if not embeddings else cp.n_ctx
        cp.n_ubatch = max(1, min(cfg.n_ubatch, cp.n_batch)) if not embeddings else cp.n_ctx
        cp.n_seq_max = max(1, cfg.slots) if not embeddings else 1
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads_batch
        try:
            cp.flash_attn_type = FLASH_ATTN[cfg.flash_attn.lower()]
        except KeyError:
            raise ModelLoadError(f"FlashAttention: unknown value {cfg.flash_attn!r} (auto, on, off)") from None
        try:
            cp.rope_scaling_type = ROPE_SCALING[cfg.rope_scaling.lower()]
        except KeyError:
            raise ModelLoadError(
                f"RopeScaling: unknown value {cfg.rope_scaling!r} (none, linear, yarn, longrope)"
            ) from None
        cp.rope_freq_base = cfg.rope_freq_base
        cp.rope_freq_scale = cfg.rope_freq_scale
        if cfg.yarn_ext_factor >= 0:
            cp.yarn_ext_factor = cfg.yarn_ext_factor
        if cfg.yarn_attn_factor >= 0:
            cp.yarn_attn_factor = cfg.yarn_attn_factor
        if cfg.yarn_beta_fast >= 0:
            cp.yarn_beta_fast = cfg.yarn_beta_fast
        if cfg.yarn_beta_slow >= 0:
            cp.yarn_beta_slow = cfg.yarn_beta_slow
        cp.yarn_orig_ctx = cfg.yarn_orig_ctx
        for name, value in (("type_k", cfg.cache_type_k), ("type_v", cfg.cache_type_v)):
            if value:
                try:
                    setattr(cp, name, CACHE_TYPES[value.lower()])
                except KeyError:
                    known = ", ".join(CACHE_TYPES)
                    label = "CacheTypeKey" if name == "type_k" else "CacheTypeValue"
                    raise ModelLoadError(f"{label}: unknown cache type {value!r} ({known})") from None
        cp.offload_kqv = cfg.offload_kqv
        cp.kv_unified = cfg.kv_unified
        cp.swa_full = cfg.swa_full
        cp.embeddings = embeddings
        if embeddings:
            cp.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
        return cp

    def _check_kv_memory(self, cells: int) -> None:
        """Refuse a KV cache larger than the machine's memory before llama.cpp tries to allocate it.

        llama.cpp zeroes the whole KV buffer at creation: an absurd ContextSize x slots would
        be killed by the OOM killer instead of failing with a reason.
        """
        n_layer = llama_cpp.llama_model_n_layer(self.model)
        n_head = max(1, llama_cpp.llama_model_n_head(self.model))
        n_head_kv = llama_cpp.llama_model_n_head_kv(self.model)
        per_cell = 2 * n_layer * (self.n_embd // n_head) * n_head_kv * 2  # K and V, f16
        need = cells * per_cell
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            return
        if need > total:
            raise ModelLoadError(
                f"the KV cache would need ~{need / 2**30:.1f} GiB ({cells} cells of {per_cell} bytes: "
                f"ContextSize x slots) but the machine has {total / 2**30:.1f} GiB; lower ContextSize or "
                "parallel, or use CacheTypeKey/CacheTypeValue q8_0")

    def _new_context(self, embeddings: bool) -> Any:
        ctx = llama_cpp.llama_init_from_model(self.model, self._context_params(embeddings))
        if not ctx:
            raise ModelLoadError("llama.cpp could not create a context (out of memory or bad parameters)")
        if self._loras:
            n = len(self._loras)
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*[a for a, _ in self._loras])
            scales = (ctypes.c_float * n)(*[s for _, s in self._loras])
            if llama_cpp.llama_set_adapters_lora(ctx, adapters, n, scales) != 0:
                llama_cpp.llama_free(ctx)
                raise ModelLoadError("llama.cpp refused the LoRA adapters for this model")
        return ctx

    def _load_context(self) -> None:
        self.ctx = self._new_context(embeddings=False)
        self.n_ctx_total = llama_cpp.llama_n_ctx(self.ctx)
        # the context one request (one sequence) can use
        self.n_ctx = min(self._n_ctx_request, llama_cpp.llama_n_ctx_seq(self.ctx))
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self.n_seq_max = llama_cpp.llama_n_seq_max(self.ctx)
        self.memory = llama_cpp.llama_get_memory(self.ctx)

    def embedding_context(self) -> Any:
        """A second context with ``embeddings=True``, created on first use.

        Why separate: turning embeddings on in the generation context would make every
        decode step also compute pooled embeddings, and the scheduler owns that context.
        """
        with self._embd_lock:
            if self._embd_ctx is None:
                self._embd_ctx = self._new_context(embeddings=True)
            return self._embd_ctx

    def close(self) -> None:
        """Free the contexts, adapters and model (idempotent)."""
        if self._embd_ctx is not None:
            llama_cpp.llama_free(self._embd_ctx)
            self._embd_ctx = None
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        for adapter, _ in self._loras:
            llama_cpp.llama_adapter_lora_free(adapter)
        self._loras = []
        if self.model is not None:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    # ---- metadata -----------------------------------------------------------------
    def _read_metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        n = llama_cpp.llama_model_meta_count(self.model)
        key_buf = ctypes.create_string_buffer(256)
        for i in range(n):
            if llama_cpp.llama_model_meta_key_by_index(self.model, i, key_buf, 256) < 0:
                continue
            size = llama_cpp.llama_model_meta_val_str_by_index(self.model, i, None, 0)
            if size < 0:
                continue
            val_buf = ctypes.create_string_buffer(size + 1)
            llama_cpp.llama_model_meta_val_str_by_index(self.model, i, val_buf, size + 1)
            out[key_buf.value.decode("utf-8", "replace")] = val_buf.value.decode("utf-8", "replace")
        return out

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, buf, 256)
        return buf.value.decode("utf-8", "replace")

    def size_bytes(self) -> int:
        return int(llama_cpp.llama_model_size(self.model))

    # ---- tokens -------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token as generated text (special tokens render empty)."""
        cached = self._piece_cache.get(token)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        out = buf.raw[:n]
        self._piece_cache[token] = out
        return out

    def token_text(self, token: int) -> str:
        """A token's text including special tokens (for BOS/EOS strings in templates)."""
        if token < 0 or token >= self.n_vocab:
            return ""
        buf = ctypes.create_string_buffer(128)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 128, 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "ignore")

    # ---- embeddings ---------------------------------------------------------------
    def embed(self, tokens: list[int]) -> list[float]:
        """One pooled, L2-normalised embedding for ``tokens`` (llama-server's default).

        Models that define no pooling (plain causal LMs) get mean pooling over the
        tokens' hidden states; the embedding context is used by one caller at a time.
        """
        import numpy as np

        ctx = self.embedding_context()
        n_ctx = llama_cpp.llama_n_ctx(ctx)
        if not tokens:
            raise ValueError("no tokens to embed")
        if len(tokens) > n_ctx:
            raise OverflowError(f"input has {len(tokens)} tokens, the context holds {n_ctx}")
        with self._embd_lock:
            mem = llama_cpp.llama_get_memory(ctx)
            llama_cpp.llama_memory_clear(mem, True)
            n = len(tokens)
            batch = llama_cpp.llama_batch_init(n, 0, 1)
            try:
                for i, t in enumerate(tokens):
                    batch.token[i] = t
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1
                batch.n_tokens = n
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed while embedding")
                pooling = llama_cpp.llama_pooling_type(ctx)
                if pooling == llama_cpp.LLAMA_POOLING_TYPE_NONE:
                    rows = [
                        np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_ith(ctx, i), shape=(self.n_embd,))
                        for i in range(n)
                    ]
                    vec = np.mean(np.stack(rows), axis=0)
                else:
                    ptr = llama_cpp.llama_get_embeddings_seq(ctx, 0)
                    vec = np.array(np.ctypeslib.as_array(ptr, shape=(self.n_embd,)))
            finally:
                llama_cpp.llama_batch_free(batch)
        norm = float(np.linalg.norm(vec))
        if norm > 0:
            vec = vec / norm
        return [float(x) for x in vec]
