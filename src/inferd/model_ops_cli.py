"""``inferd quantize`` and ``inferd finetune``: model operations from the shell.

Both start the job through the same rpcs a remote client uses and print its progress until it
ends. With ``--addr`` they talk to a running server; without it they run an in-process
``llama-cpp`` backend through the embedded transport (no server, same code path), so

    inferd quantize model.gguf q4_k_m
    inferd finetune --model model.gguf --dataset data.jsonl --output-dir run --max-steps 50

work on a machine with nothing running. Ctrl-C stops the job (with a checkpoint for training).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any


def add_model_ops_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from inferd.cli import _client_parser

    q = sub.add_parser("quantize", help="quantize a GGUF model (StartQuantization + progress)")
    q.add_argument("model", help="GGUF file or Hugging Face model directory")
    q.add_argument("type", help="quantization type, e.g. q4_k_m, q8_0, f16")
    q.add_argument("--output-dir", default="", help="where the result goes [the model's folder]")
    q.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra_options (threads, allow_requantize, pure, output_file, ...)")
    _client_parser(q)
    _progress_flag(q)
    q.set_defaults(handler=lambda a: asyncio.run(_quantize(a)), addr=None)

    f = sub.add_parser("finetune", help="LoRA fine-tuning job (StartFineTune + progress)")
    f.add_argument("--model", required=True, help="GGUF file or Hugging Face model directory")
    f.add_argument("--dataset", required=True, help=".jsonl/.json/.csv with messages, prompt/completion or text")
    f.add_argument("--output-dir", required=True, help="checkpoints and the adapter go here")
    for name, kind in (("max-steps", int), ("epochs", int), ("batch-size", int), ("grad-accum", int),
                       ("rank", int), ("alpha", float), ("learning-rate", float), ("save-steps", int),
                       ("seed", int), ("warmup-steps", int)):
        f.add_argument(f"--{name}", type=kind, default=0)
    f.add_argument("--target-modules", default="", help="comma-separated, e.g. q_proj,v_proj")
    f.add_argument("--optimizer", default="", help="adamw, sgd, adafactor")
    f.add_argument("--resume", default="", help="checkpoint directory or 'latest'")
    f.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="extra_options")
    _client_parser(f)
    _progress_flag(f)
    f.set_defaults(handler=lambda a: asyncio.run(_finetune(a)), addr=None)


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=("auto", "bar", "plain"), default="auto",
                   help="a live bar on a terminal (auto), always a bar, or one line per update [auto]")


def _options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"inferd: --option needs KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


@contextlib.asynccontextmanager
async def _client(args: argparse.Namespace) -> AsyncIterator[Any]:
    if args.addr:
        from inferd.cli import _make_client

        client = _make_client(args)
        try:
            yield client
        finally:
            await client.close()
        return
    from inferd.backends.llama_cpp import LlamaCppBackend
    from inferd.client import new_client, provide, unprovide
    from inferd.settings import Settings

    backend = LlamaCppBackend(settings=Settings.load([]))
    address = f"embedded-model-ops-{id(backend)}"
    provide(address, backend)
    client = new_client(address, parallel=True)
    try:
        yield client
    finally:
        await client.close()
        unprovide(address)
        backend.jobs.shutdown()


async def _follow(stream: AsyncIterator[Any], stop: Any, view: Any) -> int:
    last = None
    try:
        async for update in stream:
            last = update
            view.update(update)
    except (KeyboardInterrupt, asyncio.CancelledError):
        view.close(last)
        await stop()
        print("stopping...", file=sys.stderr)
        return 130
    view.close(last)
    return 0 if last is not None and last.status == "completed" else 1


async def _run(args: argparse.Namespace, start: Any, progress: str, stop: Any, show: Any) -> int:
    from inferd.client import RpcError
    from inferd.job_progress import make_view

    async with _client(args) as client:
        try:
            started = await start(client)
            print(started.message, flush=True)
            view = make_view(args.command, show, args.progress)
            return await _follow(getattr(client, progress)(job_id=started.job_id),
                                 lambda: stop(client, started.job_id), view)
        except RpcError as exc:
            print(f"inferd: {exc.code.name}: {exc.details}", file=sys.stderr)
            return 1


async def _quantize(args: argparse.Namespace) -> int:
    def show(u: Any) -> str:
        extra = "".join(f" {k}={v:.2f}" for k, v in sorted(u.extra_metrics.items())) if u.status == "completed" else ""
        return f"{u.status:10s} {u.progress_percent:5.1f}% {u.message}{extra}"

    return await _run(
        args, lambda c: c.start_quantization(model=args.model, quantization_type=args.type,
                                             output_dir=args.output_dir, extra_options=_options(args.option)),
        "quantization_progress", lambda c, j: c.stop_quantization(job_id=j), show)


async def _finetune(args: argparse.Namespace) -> int:
    def show(u: Any) -> str:
        if u.status == "training" and u.current_step:
            return (f"step {u.current_step}/{u.total_steps} epoch {u.current_epoch:.2f} loss {u.loss:.4f} "
                    f"lr {u.learning_rate:.2e} grad_norm {u.grad_norm:.3f} eta {u.eta_seconds:.0f}s")
        return f"{u.status:10s} {u.message}"

    fields = dict(model=args.model, dataset_source=args.dataset, output_dir=args.output_dir,
                  max_steps=args.max_steps, num_epochs=args.epochs, batch_size=args.batch_size,
                  gradient_accumulation_steps=args.grad_accum, adapter_rank=args.rank, adapter_alpha=args.alpha,
                  learning_rate=args.learning_rate, save_steps=args.save_steps, seed=args.seed,
                  warmup_steps=args.warmup_steps, optimizer=args.optimizer, resume_from_checkpoint=args.resume,
                  target_modules=[t for t in args.target_modules.split(",") if t],
                  extra_options=_options(args.option))
    return await _run(args, lambda c: c.start_fine_tune(**fields), "fine_tune_progress",
                      lambda c, j: c.stop_fine_tune(job_id=j, save_checkpoint=True), show)
