"""Validating a fine-tuning request into the job's parameters (in the server, before any process).

Every field of LocalAI's ``FineTuneRequest`` is either honoured or refused by name here, so a
mistaken request gets INVALID_ARGUMENT at once instead of a job that fails a minute later.
Defaults are the proto comments' (rank 16, alpha 16, lr 2e-4, 3 epochs, batch 2, grad
accumulation 4, warmup 5, weight decay 0.01, seed 3407).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from inferd.engines.finetune import dataset
from inferd.engines.quantize.plan import prepare_output_dir, resolve_input
from inferd.errors import InvalidArgument, NotFound
from inferd.limits import MAX_THREADS, bounded_int, finite_float
from inferd.paths import confine

TRAINING_TYPES = ("lora",)
TRAINING_METHODS = ("sft",)
#: optimizer name -> transformers' ``optim``.
OPTIMIZERS = {"adamw": "adamw_torch", "adamw_torch": "adamw_torch", "sgd": "sgd", "adafactor": "adafactor"}
REFUSED_OPTIMIZERS = {"adamw_8bit": "needs bitsandbytes and a CUDA GPU", "prodigy": "prodigyopt is not installed",
                      "paged_adamw_8bit": "needs bitsandbytes and a CUDA GPU"}
PRECISIONS = {"": "no", "no": "no", "fp32": "no", "bf16": "bf16"}
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
#: ``extra_options`` honoured (anything else is refused by name).
OPTIONS = {
    "max_seq_length": "tokens per example; longer ones are truncated (default 1024)",
    "threads": "torch threads (default: all cores)",
    "lr_scheduler_type": f"learning-rate schedule: {', '.join(SCHEDULERS)} (default linear)",
    "save_total_limit": "keep at most this many checkpoints (default: all)",
    "logging_steps": "report loss every N steps (default 1)",
    # proto3 cannot tell 0 from unset, so the typed fields' 0 means "the default"; these set 0 (or
    # any value) explicitly: extra_options {"warmup_steps": "0"} is no warmup.
    "warmup_steps": "explicit warmup steps (0 allowed), overriding the field",
    "weight_decay": "explicit weight decay (0 allowed), overriding the field",
}


def _int(fields: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = int(fields.get(name) or 0)
    return default if value == 0 else bounded_int(value, name, lo, hi)


def _float(fields: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = float(fields.get(name) or 0.0)
    if value == 0.0:
        return default
    return _as_typed(finite_float(value, name, lo, hi))


def _as_typed(value: float) -> float:
    """The decimal the client typed: proto floats are float32 (0.1 arrives as 0.10000000149)."""
    return float(f"{value:.7g}")


def _option_int(options: dict[str, str], key: str, default: int, lo: int, hi: int) -> int:
    text = options.get(key, "").strip()
    if not text:
        return default
    if not text.lstrip("-").isdigit():
        raise InvalidArgument(f"must be a whole number, got {text!r}", f"extra_options.{key}")
    return bounded_int(int(text), f"extra_options.{key}", lo, hi)


def _option_float(options: dict[str, str], key: str, default: float, lo: float, hi: float) -> float:
    text = options.get(key, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgument(f"must be a number, got {text!r}", f"extra_options.{key}") from None
    return finite_float(value, f"extra_options.{key}", lo, hi)


def plan_finetune(fields: dict[str, Any], job_id: str, models_dir: str | None = None) -> dict[str, Any]:
    """The job's parameters from the request's fields (a plain dict); InvalidArgument/NotFound."""
    training_type = (fields.get("training_type") or "lora").lower()
    if training_type not in TRAINING_TYPES:
        raise InvalidArgument(f"{training_type!r} is not supported; supported: {', '.join(TRAINING_TYPES)}",
                              "training_type")
    method = (fields.get("training_method") or "sft").lower()
    if method not in TRAINING_METHODS:
        raise InvalidArgument(f"{method!r} is not supported; supported: {', '.join(TRAINING_METHODS)} "
                              "(supervised fine-tuning)", "training_method")
    optimizer = (fields.get("optimizer") or "adamw").lower()
    if optimizer in REFUSED_OPTIMIZERS:
        raise InvalidArgument(f"{optimizer!r} {REFUSED_OPTIMIZERS[optimizer]}; supported: "
                              f"{', '.join(OPTIMIZERS)}", "optimizer")
    if optimizer not in OPTIMIZERS:
        raise InvalidArgument(f"unknown optimizer {optimizer!r}; supported: {', '.join(OPTIMIZERS)}", "optimizer")
    precision = (fields.get("mixed_precision") or "").lower()
    if precision not in PRECISIONS:
        raise InvalidArgument(f"{precision!r} is not supported on CPU; supported: no, bf16", "mixed_precision")
    options = {str(k): str(v) for k, v in (fields.get("extra_options") or {}).items()}
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidArgument(f"unsupported option(s) {', '.join(unknown)}; supported: {', '.join(OPTIONS)}",
                              "extra_options")
    scheduler = options.get("lr_scheduler_type", "linear")
    if scheduler not in SCHEDULERS:
        raise InvalidArgument(f"unknown schedule {scheduler!r}; supported: {', '.join(SCHEDULERS)}",
                              "extra_options.lr_scheduler_type")
    targets = [str(t) for t in fields.get("target_modules") or []]
    for t in targets:
        if not t or len(t) > 200 or any(c.isspace() for c in t):
            raise InvalidArgument(f"invalid module name {t!r}", "target_modules")

    model = resolve_input(fields.get("model", ""), models_dir)
    if model.is_dir() and not (model / "config.json").is_file():
        raise InvalidArgument(f"{str(model)!r} is a directory without config.json (not a Hugging Face model)",
                              "model")
    source = fields.get("dataset_source", "")
    if not source:
        raise InvalidArgument("must name a local .jsonl, .json or .csv file", "dataset_source")
    data_path = confine(source, models_dir, "dataset_source")
    if not data_path.is_file():
        hint = "; datasets cannot be downloaded here (no network)" if "/" in source and not os.path.isabs(source) else ""
        raise NotFound(f"dataset_source: {source!r} does not exist{hint}")
    counts = dataset.validate(data_path, fields.get("dataset_split", ""))
    if not fields.get("output_dir"):
        raise InvalidArgument("must name the directory for checkpoints and the adapter", "output_dir")
    output_dir = prepare_output_dir(fields["output_dir"], Path(), models_dir)

    resume = fields.get("resume_from_checkpoint", "")
    resume_path = ""
    if resume:
        if resume == "latest":
            from inferd.engines.finetune.checkpoints import list_checkpoints

            found = list_checkpoints(output_dir)
            if not found:
                raise NotFound(f"resume_from_checkpoint: no checkpoint in {output_dir}")
            resume_path = found[-1].path
        else:
            path = confine(resume, models_dir, "resume_from_checkpoint")
            if not (path / "trainer_state.json").is_file():
                raise NotFound(f"resume_from_checkpoint: {resume!r} is not a checkpoint directory "
                               "(no trainer_state.json)")
            resume_path = str(path)

    rank = _int(fields, "adapter_rank", 16, 1, 1024)
    params = {
        "job_id": job_id,
        "model": str(model),
        "dataset": str(data_path),
        "dataset_split": fields.get("dataset_split", ""),
        "dataset_counts": counts,
        "output_dir": str(output_dir),
        "resume_from_checkpoint": resume_path,
        "rank": rank,
        "alpha": _float(fields, "adapter_alpha", 16.0, 1e-6, 1e6),
        "dropout": _as_typed(finite_float(float(fields.get("adapter_dropout") or 0.0), "adapter_dropout", 0.0, 0.99)),
        "target_modules": targets,
        "learning_rate": _float(fields, "learning_rate", 2e-4, 1e-12, 10.0),
        "num_epochs": _int(fields, "num_epochs", 3, 1, 100_000),
        "batch_size": _int(fields, "batch_size", 2, 1, 4096),
        "gradient_accumulation_steps": _int(fields, "gradient_accumulation_steps", 4, 1, 4096),
        "warmup_steps": _option_int(options, "warmup_steps", _int(fields, "warmup_steps", 5, 0, 10_000_000),
                                    0, 10_000_000),
        "max_steps": bounded_int(int(fields.get("max_steps") or 0), "max_steps", 0, 10_000_000),
        "save_steps": bounded_int(int(fields.get("save_steps") or 0), "save_steps", 0, 10_000_000),
        "weight_decay": _option_float(options, "weight_decay", _float(fields, "weight_decay", 0.01, 0.0, 10.0),
                                      0.0, 10.0),
        "gradient_checkpointing": bool(fields.get("gradient_checkpointing")),
        "optimizer": OPTIMIZERS[optimizer],
        "seed": int(fields.get("seed") or 3407),
        "mixed_precision": PRECISIONS[precision],
        "max_seq_length": _option_int(options, "max_seq_length", 1024, 8, 1 << 20),
        "threads": _option_int(options, "threads", 0, 0, MAX_THREADS),
        "lr_scheduler_type": scheduler,
        "save_total_limit": _option_int(options, "save_total_limit", 0, 0, 1_000_000),
        "logging_steps": _option_int(options, "logging_steps", 1, 1, 1_000_000),
    }
    if resume_path:
        _check_resumable(Path(resume_path), params)
    return params


def _check_resumable(checkpoint: Path, params: dict[str, Any]) -> None:
    """A resumed run must keep the adapter's shape and the optimizer whose state it restores."""
    from inferd.engines.finetune.checkpoints import read_base_info

    trained = read_base_info(checkpoint)
    names = {"optimizer": "optimizer", "rank": "adapter_rank", "target_modules": "target_modules"}
    for key, field in names.items():
        if key in trained and trained[key] != params[key]:
            raise InvalidArgument(f"the checkpoint was trained with {trained[key]!r}, not {params[key]!r}; "
                                  "resume with the same value", field)
