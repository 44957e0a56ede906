"""The fine-tuning job (LoRA SFT on CPU), run in the job's child process.

transformers' ``Trainer`` over a PEFT LoRA model: it brings gradient accumulation, warmup
and schedules, the optimizers, checkpoints that resume exactly (optimizer, scheduler and RNG
state) and seeding, all well tested; this module adds what a job needs on top, in one
callback: a progress event per step (loss, learning rate, grad norm, epoch, ETA, tokens/s),
the stop request honoured at the next step (with a checkpoint when asked), and a checkpoint
at the last step so every run ends with one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from inferd.engines.finetune import model_io
from inferd.engines.finetune.checkpoints import BASE_INFO
from inferd.engines.finetune.dataset import load_records
from inferd.engines.finetune.examples import Collator, encode
from inferd.engines.jobs.child import JobChannel, JobFailed, JobStopped

log = logging.getLogger("inferd.finetune")


def _callback(channel: JobChannel, collator: Collator, output_dir: Path) -> Any:
    from transformers import TrainerCallback

    class JobProgress(TrainerCallback):
        """Progress events, stop at the next step, a checkpoint at the end."""

        def __init__(self) -> None:
            self.t0 = time.monotonic()
            self.first_step = 0
            self.tokens0 = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0, self.first_step, self.tokens0 = time.monotonic(), state.global_step, collator.tokens
            channel.emit(status="training", message=f"training {state.max_steps} steps",
                         total_steps=state.max_steps, total_epochs=float(state.num_train_epochs or args.num_train_epochs),
                         current_step=state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if channel.stop.is_set():
                control.should_training_stop = True
                control.should_save = channel.save_on_stop
            elif state.global_step >= state.max_steps:
                control.should_save = True  # every run ends with a checkpoint

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kw: Any) -> None:
            logs = logs or {}
            if "loss" not in logs:
                return
            done = state.global_step - self.first_step
            elapsed = time.monotonic() - self.t0
            left = max(state.max_steps - state.global_step, 0)
            event: dict[str, Any] = {
                "status": "training", "current_step": state.global_step, "total_steps": state.max_steps,
                "current_epoch": float(state.epoch or 0.0), "loss": float(logs["loss"]),
                "learning_rate": float(logs.get("learning_rate", 0.0)),
                "eta_seconds": elapsed / done * left if done else 0.0,
                "progress_percent": 100.0 * state.global_step / max(state.max_steps, 1),
                "message": f"step {state.global_step}/{state.max_steps} loss {float(logs['loss']):.4f}",
                "extra_metrics": {"tokens_per_second": (collator.tokens - self.tokens0) / max(elapsed, 1e-9),
                                  "tokens_trained": float(collator.tokens)},
            }
            if logs.get("grad_norm") is not None:
                event["grad_norm"] = float(logs["grad_norm"])
            channel.emit(**event)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            path = output_dir / f"checkpoint-{state.global_step}"
            _write_base_info(path, args)
            channel.emit(status="saving", checkpoint_path=str(path),
                         message=f"checkpoint saved at step {state.global_step}: {path}")

    return JobProgress()


_BASE: dict[str, Any] = {}


def _write_base_info(path: Path, args: Any = None) -> None:
    if path.is_dir():
        (path / BASE_INFO).write_text(json.dumps(_BASE, indent=1), encoding="utf-8")


def build_trainer(p: dict[str, Any], channel: JobChannel | None) -> tuple[Any, Any, Collator]:
    """The tokenizer, the PEFT model and the Trainer of a job's parameters (also used by the bench)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    if p.get("threads"):
        torch.set_num_threads(int(p["threads"]))
    set_seed(int(p["seed"]))
    output_dir = Path(p["output_dir"])
    emit = channel.emit if channel else (lambda **kw: None)
    emit(status="loading_model", message=f"loading {p['model']}")
    tokenizer = model_io.load_tokenizer(p["model"])
    model = model_io.load_model(p["model"])
    base_dir = output_dir / "base_config"  # what convert_lora_to_gguf needs of the base (config only)
    model.config.architectures = [type(model).__name__]  # what llama.cpp's converters key on
    model.config.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    _BASE.update({"model": p["model"], "base_config": str(base_dir), "optimizer": p["optimizer"],
                  "rank": int(p["rank"]), "target_modules": list(p.get("target_modules") or [])})
    _write_base_info(output_dir)

    emit(status="loading_dataset", message=f"tokenizing {p['dataset']}")
    records = load_records(Path(p["dataset"]), p.get("dataset_split", ""))
    examples = [encode(tokenizer, r, i, int(p["max_seq_length"])) for i, r in enumerate(records)]
    if channel:
        channel.check_stop()

    targets = p.get("target_modules") or None
    try:
        lora = LoraConfig(r=int(p["rank"]), lora_alpha=float(p["alpha"]), lora_dropout=float(p["dropout"]),
                          target_modules=targets, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        raise JobFailed(f"target_modules {targets}: {exc}; this model's linear layers: {', '.join(names)}") from None
    if p.get("gradient_checkpointing"):
        model.enable_input_require_grads()
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=int(p["batch_size"]),
        gradient_accumulation_steps=int(p["gradient_accumulation_steps"]), learning_rate=float(p["learning_rate"]),
        num_train_epochs=float(p["num_epochs"]), max_steps=int(p["max_steps"]) or -1,
        warmup_steps=int(p["warmup_steps"]), weight_decay=float(p["weight_decay"]),
        lr_scheduler_type=p["lr_scheduler_type"], optim=p["optimizer"], seed=int(p["seed"]),
        data_seed=int(p["seed"]), logging_steps=int(p["logging_steps"]),
        save_strategy="steps" if int(p["save_steps"]) else "no", save_steps=int(p["save_steps"]) or 500,
        save_total_limit=int(p["save_total_limit"]) or None, bf16=p["mixed_precision"] == "bf16",
        activation_checkpointing=bool(p.get("gradient_checkpointing")), use_cpu=True, report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, max_grad_norm=1.0,
    )
    collator = Collator(tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator)
    if channel:
        trainer.add_callback(_callback(channel, collator, output_dir))
    return tokenizer, trainer, collator


def run(p: dict[str, Any], channel: JobChannel) -> dict[str, Any]:
    channel.exit_on_stop = True  # nothing to save while loading: a stop exits at once
    _, trainer, collator = build_trainer(p, channel)
    channel.exit_on_stop = False
    channel.check_stop()
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=p.get("resume_from_checkpoint") or None)
    seconds = time.monotonic() - started
    state = trainer.state
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    if channel.stop.is_set():
        saved = Path(p["output_dir"]) / f"checkpoint-{state.global_step}"
        raise JobStopped(f"stopped at step {state.global_step}"
                         + (f"; checkpoint {saved}" if channel.save_on_stop and saved.is_dir() else ""))
    final = Path(p["output_dir"]) / f"checkpoint-{state.global_step}"
    trainer.save_model(p["output_dir"])  # the final adapter at the top of output_dir too
    return {
        "message": f"trained {state.global_step} steps; loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
                   f"adapter {p['output_dir']}; checkpoint {final}" if losses else "trained",
        "current_step": state.global_step, "total_steps": state.max_steps, "current_epoch": float(state.epoch or 0),
        "loss": float(losses[-1]) if losses else 0.0, "checkpoint_path": str(final), "eta_seconds": 0.0,
        "extra_metrics": {"train_seconds": seconds, "first_loss": float(losses[0]) if losses else 0.0,
                          "train_loss": float(result.training_loss),
                          "tokens_per_second": collator.tokens / max(seconds, 1e-9),
                          "tokens_trained": float(collator.tokens)},
    }
