"""Exporting a fine-tuning checkpoint: PEFT adapter, GGUF LoRA adapter, merged model, merged GGUF.

Formats (``ExportModelRequest.export_format``):

* ``lora``: the PEFT adapter (``adapter_model.safetensors`` + ``adapter_config.json``), copied.
* ``gguf_lora``: the adapter as a GGUF LoRA file that llama.cpp loads on top of the base
  (``LoadModel(LoraAdapter=...)``), by llama.cpp's ``convert_lora_to_gguf.py``;
  ``quantization_method`` f32, f16 (default), bf16 or q8_0.
* ``merged_16bit``: base + adapter merged (``merge_and_unload``), saved as a float16
  Hugging Face model directory with its tokenizer.
* ``gguf``: the merged model as one GGUF file (LocalAI/unsloth meaning of "gguf"): merged,
  converted by llama.cpp's ``convert_hf_to_gguf.py`` to f16, then quantized to
  ``quantization_method`` (default f16) by llama.cpp's quantizer.

Refused by name: ``merged_4bit`` (bitsandbytes needs a CUDA GPU), ``loha``/``lokr`` (only
LoRA is trained), ``diffusers``. The heavy formats run in a job's child process (see
``inferd.engines.jobs``) because a merge holds the whole model in memory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from inferd.engines.finetune import model_io
from inferd.engines.finetune.checkpoints import read_base_info
from inferd.engines.jobs.child import JobChannel, JobFailed
from inferd.engines.quantize.plan import resolve_input
from inferd.engines.quantize.scripts import run_script
from inferd.engines.quantize.types import parse_ftype
from inferd.errors import InvalidArgument, NotFound
from inferd.paths import confine

FORMATS = ("lora", "gguf_lora", "merged_16bit", "gguf")
REFUSED = {
    "merged_4bit": "needs bitsandbytes, which needs a CUDA GPU",
    "loha": "only LoRA adapters are trained here (training_type lora)",
    "lokr": "only LoRA adapters are trained here (training_type lora)",
    "diffusers": "this is a language-model backend",
}
LORA_GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
#: The child-process entry point of an export.
TASK = "inferd.engines.finetune.export:run"


def plan_export(checkpoint_path: str, output_path: str, export_format: str, quantization_method: str,
                model: str, options: dict[str, str], models_dir: str | None = None) -> dict[str, Any]:
    """The export's parameters; InvalidArgument/NotFound naming the field."""
    fmt = (export_format or "lora").lower()
    if fmt in REFUSED:
        raise InvalidArgument(f"{fmt!r} {REFUSED[fmt]}; supported: {', '.join(FORMATS)}", "export_format")
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}", "export_format")
    if options:
        raise InvalidArgument(f"unsupported option(s) {', '.join(sorted(options))}; none are supported",
                              "extra_options")
    if not checkpoint_path:
        raise InvalidArgument("must name a checkpoint directory (see ListCheckpoints)", "checkpoint_path")
    checkpoint = confine(checkpoint_path, models_dir, "checkpoint_path")
    if not checkpoint.exists():
        raise NotFound(f"checkpoint_path: {checkpoint_path!r} does not exist")
    if not (checkpoint / "adapter_config.json").is_file():
        raise InvalidArgument(f"{checkpoint_path!r} holds no adapter_config.json: not a LoRA checkpoint",
                              "checkpoint_path")
    if not output_path:
        raise InvalidArgument("must name where to write the export", "output_path")
    output = confine(output_path, models_dir, "output_path")

    qtype = quantization_method.strip().lower()
    if fmt in ("lora", "merged_16bit"):
        if qtype:
            raise InvalidArgument(f"does not apply to {fmt} (only to gguf and gguf_lora)", "quantization_method")
    elif fmt == "gguf_lora":
        qtype = qtype or "f16"
        if qtype not in LORA_GGUF_TYPES:
            raise InvalidArgument(f"a GGUF LoRA adapter can be {', '.join(LORA_GGUF_TYPES)}, not {qtype!r}",
                                  "quantization_method")
    else:
        qtype = parse_ftype(qtype or "f16", "quantization_method")[0]

    if fmt in ("gguf_lora", "gguf"):
        if output.suffix.lower() != ".gguf":  # a directory to write the file into
            if output.exists() and not output.is_dir():
                raise InvalidArgument("give a path ending in .gguf, or a directory", "output_path")
            suffix = "lora-" if fmt == "gguf_lora" else ""
            output = output / f"{checkpoint.parent.name}-{checkpoint.name}-{suffix}{qtype}.gguf"
        _mkdir(output.parent)
    else:
        if output.exists() and not output.is_dir():
            raise InvalidArgument(f"{output_path!r} is a file; {fmt} is written as a directory", "output_path")
        _mkdir(output)

    base = model or read_base_info(checkpoint).get("model", "")
    if fmt != "lora" and not base:
        raise InvalidArgument("the checkpoint does not name its base model: give it in model", "model")
    base_path = resolve_input(base, models_dir) if base else None
    info = read_base_info(checkpoint)
    return {"format": fmt, "checkpoint": str(checkpoint), "output": str(output), "qtype": qtype,
            "model": str(base_path or ""), "base_config": info.get("base_config", "")}


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidArgument(f"cannot create {str(path)!r}: {exc.strerror or exc}", "output_path") from None


def copy_adapter(checkpoint: Path, output: Path) -> list[str]:
    """The ``lora`` format: the adapter files of a checkpoint, copied (quick; no child needed)."""
    copied = []
    for name in ADAPTER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, output / name)
            copied.append(name)
    return copied


# ---- the child-process side --------------------------------------------------------------
def _base_config_dir(p: dict[str, Any], scratch: Path) -> str:
    """A directory with the base model's config.json (all convert_lora_to_gguf reads of it)."""
    if p.get("base_config") and (Path(p["base_config"]) / "config.json").is_file():
        return str(p["base_config"])
    model = Path(p["model"])
    if model.is_dir():
        return str(model)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model.parent), gguf_file=model.name)
    if not getattr(config, "architectures", None):
        config.architectures = [_causal_lm_class(config)]
    config.save_pretrained(scratch)
    return str(scratch)


def _causal_lm_class(config: Any) -> str:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)].__name__


def _merge(p: dict[str, Any], out_dir: Path, channel: JobChannel) -> None:
    import torch
    from peft import PeftModel

    channel.emit(status="loading_model", message=f"loading {p['model']}")
    tokenizer = model_io.load_tokenizer(p["model"])
    model = model_io.load_model(p["model"])
    channel.check_stop()
    channel.emit(status="saving", message="merging the adapter")
    merged = PeftModel.from_pretrained(model, p["checkpoint"]).merge_and_unload()
    merged = merged.to(torch.float16)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def run(p: dict[str, Any], channel: JobChannel) -> dict[str, Any]:
    fmt, output = p["format"], Path(p["output"])
    partial = output.with_name(f".{output.name}.part")
    try:
        if fmt == "gguf_lora":
            base = _base_config_dir(p, partial.with_suffix(".config"))
            channel.emit(status="saving", message="converting the adapter to GGUF")
            run_script("convert_lora_to_gguf.py", [p["checkpoint"], "--base", base, "--outfile", str(partial),
                                                   "--outtype", p["qtype"]], channel.stop)
            partial.replace(output)
        elif fmt == "merged_16bit":
            _merge(p, output, channel)
        elif fmt == "gguf":
            hf_dir = partial.with_suffix(".hf")
            _merge(p, hf_dir, channel)
            direct = p["qtype"] in ("f16", "f32", "bf16", "q8_0")
            f16 = partial if direct else partial.with_suffix(".f16")
            channel.emit(status="saving", message="converting the merged model to GGUF")
            run_script("convert_hf_to_gguf.py", [str(hf_dir), "--outfile", str(f16), "--outtype",
                                                 p["qtype"] if direct else "f16"], channel.stop)
            if not direct:
                _quantize(f16, partial, p["qtype"], channel)
            partial.replace(output)
        else:
            raise JobFailed(f"unknown export format {fmt!r}")
    finally:
        for leftover in (partial, partial.with_suffix(".f16"), partial.with_suffix(".config"),
                         partial.with_suffix(".hf")):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.exists():
                leftover.unlink()
    return {"message": f"exported {fmt} to {output}", "output_file": str(output)}


def _quantize(src: Path, dst: Path, qtype: str, channel: JobChannel) -> None:
    from inferd.engines.quantize import task as qtask

    _, ftype = parse_ftype(qtype)
    qtask.run({"source": str(src), "output": str(dst), "partial": str(dst) + ".q", "converted": str(dst) + ".c",
               "ftype": ftype, "type_name": qtype, "allow_requantize": False}, channel)
