"""Validating a quantization request in the server, before any process starts.

Everything a person can get wrong is refused here with the field named (unknown type,
unknown option, missing file, an output directory that cannot be created, a path outside
``INFERD_MODELS_DIR``). What can only be known by reading the file (is it a GGUF?) is the
job's business: it fails with the reason.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferd.engines.quantize.types import parse_ftype, parse_ggml_type
from inferd.errors import InvalidArgument, NotFound
from inferd.limits import MAX_THREADS, bounded_int
from inferd.paths import confine

#: ``extra_options`` a quantization honours (anything else is refused by name).
OPTIONS = {
    "threads": "threads to quantize with (default: all cores)",
    "allow_requantize": "quantize tensors that are already quantized (default true: the packaged models are)",
    "leave_output_tensor": "keep output.weight unquantized (llama-quantize --leave-output-tensor)",
    "pure": "every tensor at the chosen type, no mixed k-quant layout (--pure)",
    "output_tensor_type": "type of output.weight (--output-tensor-type)",
    "token_embedding_type": "type of token_embd.weight (--token-embedding-type)",
    "output_file": "file name of the result inside output_dir (default: <model>-<TYPE>.gguf)",
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
_QUANT_SUFFIX = re.compile(r"[.-](f32|f16|bf16|q\d(_k)?(_[a-z0-9]+)?|iq\d_[a-z]+|tq\d_0)$", re.IGNORECASE)


@dataclass
class QuantizePlan:
    source: Path
    output: Path
    partial: Path
    type_name: str
    params: dict[str, Any] = field(default_factory=dict)


def _bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InvalidArgument(f"must be true or false, got {value!r}", f"extra_options.{key}")


def resolve_input(model: str, models_dir: str | None, field_name: str = "model") -> Path:
    """A local model path (file or HF directory), confined; NotFound when it does not exist."""
    if not model:
        raise InvalidArgument("must name a local GGUF file or Hugging Face model directory", field_name)
    path = confine(model, models_dir, field_name)
    if not path.exists():
        hint = ("; models cannot be downloaded here (no network): give a local path"
                if "/" in model and not os.path.isabs(model) else "")
        raise NotFound(f"{field_name}: {model!r} does not exist{hint}")
    return path


def prepare_output_dir(output_dir: str, default: Path, models_dir: str | None,
                       field_name: str = "output_dir") -> Path:
    """``output_dir`` confined and created (with parents); InvalidArgument if it cannot be."""
    path = confine(output_dir, models_dir, field_name) if output_dir else default
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidArgument(f"cannot create {str(path)!r}: {exc.strerror or exc}", field_name) from None
    if not os.access(path, os.W_OK):
        raise InvalidArgument(f"{str(path)!r} is not writable", field_name)
    return path


def plan_quantization(model: str, quantization_type: str, output_dir: str, job_id: str,
                      options: dict[str, str], models_dir: str | None = None) -> QuantizePlan:
    type_name, ftype = parse_ftype(quantization_type)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidArgument(f"unsupported option(s) {', '.join(unknown)}; supported: {', '.join(OPTIONS)}"
                              + ("; hf_token is not needed: nothing is downloaded" if "hf_token" in unknown else ""),
                              "extra_options")
    source = resolve_input(model, models_dir)
    out_dir = prepare_output_dir(output_dir, source.parent, models_dir)
    name = options.get("output_file", "")
    if name:
        if os.path.basename(name) != name or name in (".", ".."):
            raise InvalidArgument("must be a file name, not a path", "extra_options.output_file")
    else:
        stem = _QUANT_SUFFIX.sub("", source.stem if source.is_file() else source.name)
        name = f"{stem}-{type_name.upper()}.gguf"
    output = out_dir / name
    if output.resolve() == source.resolve():
        raise InvalidArgument("the output would overwrite the input model", "extra_options.output_file")
    params: dict[str, Any] = {
        "source": str(source), "output": str(output), "ftype": ftype, "type_name": type_name,
        "threads": _threads(options.get("threads", "")),
        "allow_requantize": _bool("allow_requantize", options.get("allow_requantize", "true")),
        "leave_output_tensor": _bool("leave_output_tensor", options.get("leave_output_tensor", "false")),
        "pure": _bool("pure", options.get("pure", "false")),
    }
    for key in ("output_tensor_type", "token_embedding_type"):
        if options.get(key):
            params[key] = parse_ggml_type(options[key], f"extra_options.{key}")
    partial = out_dir / f".{name}.{job_id}.part"
    params["partial"] = str(partial)
    converted = out_dir / f".{name}.{job_id}.f16.part"
    params["converted"] = str(converted)
    return QuantizePlan(source, output, partial, type_name, params)


def _threads(value: str) -> int:
    text = value.strip()
    if text and not text.isdigit():
        raise InvalidArgument(f"must be a whole number, got {value!r}", "extra_options.threads")
    return bounded_int(int(text or 0), "extra_options.threads", 0, MAX_THREADS)
