"""Loading a base model for training or merging: a GGUF file or a Hugging Face directory.

transformers reads a GGUF file directly (``from_pretrained(folder, gguf_file=name)``) and
dequantizes it to float32: that is how the packaged SmolLM2 (Q4_1) is fine-tuned without any
download. Only local paths: the job runs with the hub offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferd.engines.jobs.child import JobFailed


def _location(model: str) -> tuple[str, dict[str, Any]]:
    path = Path(model)
    if path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    where, extra = _location(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    except Exception as exc:  # noqa: BLE001 - any loader error fails the job with its reason
        raise JobFailed(f"cannot load the tokenizer of {model}: {type(exc).__name__}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, dtype: Any = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    where, extra = _location(model)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or torch.float32, **extra)
    except Exception as exc:  # noqa: BLE001
        raise JobFailed(f"cannot load {model} with transformers: {type(exc).__name__}: {exc}") from None
    if extra:
        # A GGUF's weights are dequantized to plain float tensors at load; the "GGUF quantizer"
        # transformers leaves on the model only records where they came from, but it makes the
        # Trainer (and merges) refuse a model that is in fact an ordinary float one.
        quantizer = getattr(loaded, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(loaded)
        for module in loaded.modules():
            config = getattr(module, "config", None)
            if getattr(config, "_is_quantized", False):
                config._is_quantized = False
    return loaded
