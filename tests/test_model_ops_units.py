"""Model operations, the parts that need no model: job runner, validation, datasets, ctypes layout.

The runner tests run real child processes with the small tasks of tests/model_ops_tasks.py;
the end-to-end jobs on real models are in tests/test_model_ops.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

from inferd.engines.finetune import dataset, list_checkpoints, plan_export, plan_finetune
from inferd.engines.jobs import COMPLETED, FAILED, STOPPED, Job, JobRunner, new_job_id
from inferd.engines.quantize import FTYPES, GGML_TYPES, parse_ftype, plan_quantization
from inferd.errors import AlreadyExists, InvalidArgument, NotFound
from tests.helpers import ROOT

TASKS = "tests.model_ops_tasks"


def _runner(**kw) -> JobRunner:
    return JobRunner(**kw)


def _submit(runner: JobRunner, tmp_path: Path, task: str, job_id: str, **params) -> Job:
    params["_env"] = {"PYTHONPATH": str(ROOT)}
    return runner.submit("finetune", f"{TASKS}:{task}", params, job_id=job_id,
                         log_path=tmp_path / f"{job_id}.log")


# ---- the job runner --------------------------------------------------------------------
def test_job_runs_in_a_child_and_reports_progress(tmp_path) -> None:
    runner = _runner()
    job = _submit(runner, tmp_path, "count", "a", n=4)
    assert job.wait(60), job.snapshot
    assert job.status == COMPLETED and job.snapshot["message"] == "counted to 4"
    _, updates = job.updates_since(0)
    steps = [u.get("current_step") for u in updates if u["status"] == "training"]
    assert steps == [1, 2, 3, 4]
    assert job.pid and job.log_path.read_text().startswith("=== job a (finetune) started")


async def test_two_watchers_get_the_same_updates_from_where_they_attach(tmp_path) -> None:
    runner = _runner()
    job = _submit(runner, tmp_path, "count", "w", n=6, delay=0.3)

    async def collect() -> list[dict]:
        return [u async for u in job.watch()]

    first = asyncio.create_task(collect())
    while job.snapshot.get("current_step", 0) < 2:
        await asyncio.sleep(0.05)
    second = asyncio.create_task(collect())
    a, b = await asyncio.wait_for(asyncio.gather(first, second), 60)
    assert a[-1]["status"] == b[-1]["status"] == COMPLETED
    a_steps = [u.get("current_step") for u in a if u["status"] == "training"]
    b_steps = [u.get("current_step") for u in b if u["status"] == "training"]
    assert a_steps[-4:] == [3, 4, 5, 6] and b_steps[0] >= 2  # the late one starts at the current point
    assert b_steps == a_steps[a_steps.index(b_steps[0]):]  # ... and then sees the same updates


async def test_a_watcher_that_goes_away_does_not_touch_the_job(tmp_path) -> None:
    runner = _runner()
    job = _submit(runner, tmp_path, "count", "gone", n=5, delay=0.2)
    stream = job.watch()
    await stream.__anext__()
    await stream.aclose()  # a client disconnect closes its stream
    async def read_all() -> None:
        async for _ in job.watch():
            pass

    task = asyncio.create_task(read_all())
    await asyncio.sleep(0.1)
    task.cancel()  # ... or cancels it while it waits for the next update
    with pytest.raises(asyncio.CancelledError):
        await task
    assert job.wait(60) and job.status == COMPLETED and not job._waiters


async def test_a_watcher_of_a_finished_job_gets_the_final_state(tmp_path) -> None:
    runner = _runner()
    job = _submit(runner, tmp_path, "count", "done", n=1, delay=0.0)
    assert job.wait(60)
    updates = [u async for u in job.watch()]
    assert [u["status"] for u in updates] == [COMPLETED]


def test_stop_ends_a_polling_job_at_its_next_step(tmp_path) -> None:
    runner = _runner()
    job = _submit(runner, tmp_path, "count", "s", n=1000, delay=0.05)
    while job.snapshot.get("current_step", 0) < 2:
        time.sleep(0.02)
    asked = time.monotonic()
    runner.stop("s", save_checkpoint=True)
    assert job.wait(30)
    assert job.status == STOPPED and "save=True" in job.snapshot["message"]
    assert time.monotonic() - asked < 5


def test_a_killed_child_fails_the_job_with_the_signal_and_its_log(tmp_path) -> None:
    runner = _runner()
    job = _submit(runner, tmp_path, "die", "k")
    assert job.wait(60)
    assert job.status == FAILED
    assert "SIGKILL" in job.snapshot["message"] and "out-of-memory" in job.snapshot["message"]
    assert "dying now" in job.snapshot["message"]  # the tail of the job's log


def test_a_failing_task_fails_with_its_reason(tmp_path) -> None:
    job = _submit(_runner(), tmp_path, "fail", "f")
    assert job.wait(60)
    assert job.status == FAILED and job.snapshot["message"] == "the input was bad on purpose"


def test_a_child_that_ignores_stop_is_killed_after_the_grace(tmp_path) -> None:
    runner = _runner(stop_grace=0.5)
    job = _submit(runner, tmp_path, "deaf", "d")
    while job.status != "training":
        time.sleep(0.02)
    runner.stop("d")
    assert job.wait(30)
    assert job.status == STOPPED


def test_queue_already_exists_and_unknown_ids(tmp_path) -> None:
    runner = _runner(max_running=1)
    first = _submit(runner, tmp_path, "count", "q1", n=1000, delay=0.05)
    second = _submit(runner, tmp_path, "count", "q2", n=1)
    time.sleep(0.5)
    assert second.status == "queued"
    assert runner.breakdown()["jobs_queued"] == 1 and runner.breakdown()["jobs_running"] == 1
    with pytest.raises(AlreadyExists):
        _submit(runner, tmp_path, "count", "q1", n=1)
    runner.stop("q2")  # stopped while queued: never starts
    assert second.wait(5) and second.status == STOPPED and second.pid is None
    runner.stop("q1")
    assert first.wait(30) and first.status == STOPPED
    again = _submit(runner, tmp_path, "count", "q1", n=1)  # a finished id may be reused
    assert again.wait(60) and again.status == COMPLETED
    with pytest.raises(NotFound):
        runner.get("nope")
    with pytest.raises(NotFound):
        runner.stop("nope")


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_pre_started_spare_runs_the_next_job_and_is_refilled_after_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # spares see the server's environment: the tests' tasks
    runner = _runner(spares=[f"{TASKS}:die", f"{TASKS}:count"])
    try:
        assert len(runner.spares.pids()) == 2
        spare_pid = runner.spares.pids()[0]
        # a job on the spare: same process, its output redirected to the job's log (the
        # tail in the failure), and a crash still fails only the job
        job = runner.submit("finetune", f"{TASKS}:die", {}, job_id="s1", log_path=tmp_path / "s1.log")
        assert job.wait(60) and job.status == FAILED
        assert job.pid == spare_pid and runner.spares.taken == 1
        assert "SIGKILL" in job.snapshot["message"] and "dying now" in job.snapshot["message"]
        assert (tmp_path / "s1.log").read_text().startswith("=== job s1 (finetune) started")
        # refilled once the job ended
        _wait_for(lambda: len(runner.spares.pids()) == 2 and spare_pid not in runner.spares.pids())
        # a job with its own environment cannot use a spare: it starts fresh
        fresh = _submit(runner, tmp_path, "count", "s2", n=2)
        assert fresh.wait(60) and fresh.status == COMPLETED and runner.spares.taken == 1
        # a spare that died while idle is not used; the job starts fresh and completes
        count_spare = [p for p in runner.spares.pids() if p != runner.spares._spares[f"{TASKS}:die"][0].pid][0]
        os.kill(count_spare, signal.SIGKILL)
        _wait_for(lambda: runner.spares._spares[f"{TASKS}:count"][0].poll() is not None)
        job = runner.submit("finetune", f"{TASKS}:count", {"n": 2}, job_id="s3", log_path=tmp_path / "s3.log")
        assert job.wait(60) and job.status == COMPLETED and job.pid != count_spare
        assert runner.spares.taken == 1
        # the next one does run on the refilled spare
        _wait_for(lambda: len(runner.spares.pids()) == 2)
        job = runner.submit("finetune", f"{TASKS}:count", {"n": 3}, job_id="s4", log_path=tmp_path / "s4.log")
        assert job.wait(60) and job.status == COMPLETED and job.snapshot["message"] == "counted to 3"
        assert runner.spares.taken == 2
    finally:
        pids = runner.spares.pids()
        runner.shutdown()
    assert pids and runner.spares.pids() == []
    for pid in pids:  # killed and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_job_ids() -> None:
    assert len(new_job_id("")) == 16
    assert new_job_id("my-job_1.2") == "my-job_1.2"
    for bad in ("../x", "a/b", "-x", "x" * 129, "a b"):
        with pytest.raises(InvalidArgument) as e:
            new_job_id(bad)
        assert e.value.field == "job_id"


# ---- quantization: types and the ctypes layout against the built llama.cpp ----------------
def test_quantization_types_match_llama_cpp() -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    names = {"f32": "ALL_F32"}
    for name, value in FTYPES.items():
        assert getattr(llama_cpp, f"LLAMA_FTYPE_{names.get(name, 'MOSTLY_' + name.upper())}") == value, name
    for name, value in GGML_TYPES.items():
        if name != "bf16":  # llama-cpp-python does not export GGML_TYPE_BF16 (ggml.h: 30)
            assert getattr(llama_cpp, f"GGML_TYPE_{name.upper()}") == value, name


def test_quantize_params_layout_reads_back_llama_cpp_defaults() -> None:
    """A wrong ctypes layout shows as garbage here (the C defaults are llama-quant.cpp's)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    p = llama_cpp.llama_model_quantize_default_params()
    assert (p.nthread, p.ftype) == (0, llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)
    assert p.output_tensor_type == p.token_embedding_type == llama_cpp.GGML_TYPE_COUNT
    assert (p.allow_requantize, p.quantize_output_tensor, p.only_copy, p.pure, p.keep_split, p.dry_run) == (
        False, True, False, False, False, False)
    assert not p.imatrix and not p.kv_overrides and not p.tt_overrides and not p.prune_layers
    assert p.max_buf_size > 0


def test_quantization_request_validation(tmp_path) -> None:
    model = tmp_path / "m.Q4_1.gguf"
    model.write_bytes(b"GGUF....")
    with pytest.raises(InvalidArgument) as e:
        parse_ftype("q9_9")
    assert e.value.field == "quantization_type" and "q4_k_m" in str(e.value) and "q8_0" in str(e.value)
    assert parse_ftype("Q4_K")[0] == "q4_k_m"
    plan = plan_quantization(str(model), "q8_0", str(tmp_path / "out" / "deep"), "j", {})
    assert plan.output == tmp_path / "out" / "deep" / "m-Q8_0.gguf" and plan.output.parent.is_dir()
    assert plan.params["allow_requantize"] is True
    cases = [
        (dict(options={"hf_token": "x"}), "extra_options"),
        (dict(options={"threads": "two"}), "extra_options.threads"),
        (dict(options={"pure": "maybe"}), "extra_options.pure"),
        (dict(options={"output_file": "../x.gguf"}), "extra_options.output_file"),
        (dict(options={"output_file": "m.Q4_1.gguf"}, out=str(tmp_path)), "extra_options.output_file"),
        (dict(options={"output_tensor_type": "q7"}), "extra_options.output_tensor_type"),
        (dict(model=""), "model"),
        (dict(out=str(model / "sub")), "output_dir"),  # under a file: cannot be created
        (dict(models_dir=str(tmp_path / "jail")), "model"),
    ]
    for case, field in cases:
        with pytest.raises(InvalidArgument) as e:
            plan_quantization(case.get("model", str(model)), "q8_0", case.get("out", ""), "j",
                              case.get("options", {}), case.get("models_dir"))
        assert e.value.field == field, (case, e.value)
    with pytest.raises(NotFound):
        plan_quantization(str(tmp_path / "missing.gguf"), "q8_0", "", "j", {})
    with pytest.raises(NotFound) as nf:
        plan_quantization("HuggingFaceTB/SmolLM2-135M", "q8_0", "", "j", {})
    assert "no network" in str(nf.value)


# ---- fine-tuning: datasets and request validation ---------------------------------------------
def test_dataset_formats(tmp_path) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(chat) + "\n\n" + json.dumps({"text": "t"}) + "\n")
    assert dataset.validate(tmp_path / "d.jsonl") == {"messages": 1, "prompt_completion": 0, "text": 1}
    (tmp_path / "d.json").write_text(json.dumps({"train": [{"prompt": "p", "completion": "c"}],
                                                 "test": [{"text": "x"}, {"text": "y"}]}))
    assert dataset.validate(tmp_path / "d.json", "test")["text"] == 2
    assert dataset.validate(tmp_path / "d.json")["prompt_completion"] == 1
    (tmp_path / "d.csv").write_text('prompt,completion\n"a, b",c\n')
    assert dataset.validate(tmp_path / "d.csv")["prompt_completion"] == 1
    (tmp_path / "m.csv").write_text('messages\n"' + json.dumps(chat["messages"]).replace('"', '""') + '"\n')
    assert dataset.validate(tmp_path / "m.csv")["messages"] == 1
    bad = {
        "b1.jsonl": ("{nope\n", "line 1"), "b2.jsonl": ('{"x": 1}\n', "none of messages"),
        "b3.jsonl": ('{"messages": [{"role": "user", "content": "q"}]}\n', "no assistant turn"),
        "b4.jsonl": ('{"prompt": "p"}\n', "completion"), "b5.txt": ("x", "unsupported file type"),
        "b6.jsonl": ("", "no records"), "b7.jsonl": ("[1]\n", "not an object"),
    }
    for name, (text, why) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InvalidArgument) as e:
            dataset.validate(tmp_path / name)
        assert why in str(e.value) and e.value.field == "dataset_source", name
    with pytest.raises(InvalidArgument) as e:
        dataset.validate(tmp_path / "d.json", "validation")
    assert e.value.field == "dataset_split" and "train, test" in str(e.value)
    with pytest.raises(InvalidArgument) as e:
        dataset.validate(tmp_path / "d.jsonl", "test")
    assert e.value.field == "dataset_split"


def test_finetune_request_validation(tmp_path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    base = {"model": str(model), "dataset_source": str(data), "output_dir": str(tmp_path / "o")}
    p = plan_finetune(base, "j")
    assert (p["rank"], p["alpha"], p["learning_rate"], p["num_epochs"], p["batch_size"],
            p["gradient_accumulation_steps"], p["warmup_steps"], p["weight_decay"], p["seed"]) == (
        16, 16.0, 2e-4, 3, 2, 4, 5, 0.01, 3407)
    explicit = plan_finetune({**base, "extra_options": {"warmup_steps": "0", "weight_decay": "0"}}, "j")
    assert (explicit["warmup_steps"], explicit["weight_decay"]) == (0, 0.0)
    cases = [
        ({"extra_options": {"weight_decay": "nan"}}, "extra_options.weight_decay", "finite"),
        ({"training_type": "full"}, "training_type", "lora"),
        ({"training_method": "dpo"}, "training_method", "sft"),
        ({"optimizer": "adamw_8bit"}, "optimizer", "bitsandbytes"),
        ({"optimizer": "lion"}, "optimizer", "adafactor"),
        ({"mixed_precision": "fp16"}, "mixed_precision", "bf16"),
        ({"learning_rate": float("nan")}, "learning_rate", "finite"),
        ({"adapter_rank": 100000}, "adapter_rank", "between"),
        ({"adapter_dropout": 1.5}, "adapter_dropout", "<="),
        ({"batch_size": -1}, "batch_size", "between"),
        ({"target_modules": ["q proj"]}, "target_modules", "invalid"),
        ({"extra_options": {"foo": "1"}}, "extra_options", "max_seq_length"),
        ({"extra_options": {"lr_scheduler_type": "zigzag"}}, "extra_options.lr_scheduler_type", "cosine"),
        ({"extra_options": {"max_seq_length": "x"}}, "extra_options.max_seq_length", "whole number"),
        ({"dataset_source": ""}, "dataset_source", "local"),
        ({"output_dir": ""}, "output_dir", "directory"),
        ({"model": str(tmp_path)}, "model", "config.json"),
    ]
    for override, field, words in cases:
        with pytest.raises(InvalidArgument) as e:
            plan_finetune({**base, **override}, "j")
        assert e.value.field == field and words in str(e.value), (override, e.value)
    for override in ({"dataset_source": str(tmp_path / "none.jsonl")}, {"model": str(tmp_path / "none.gguf")},
                     {"resume_from_checkpoint": str(tmp_path)}, {"resume_from_checkpoint": "latest"}):
        with pytest.raises(NotFound):
            plan_finetune({**base, **override}, "j")
    with pytest.raises(InvalidArgument) as e:
        plan_finetune(base, "j", models_dir=str(tmp_path / "jail"))
    assert e.value.field == "model" and "INFERD_MODELS_DIR" in str(e.value)


def test_export_request_validation(tmp_path) -> None:
    ckpt = tmp_path / "out" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_config.json").write_text("{}")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3, "epoch": 1.5,
                                                         "log_history": [{"loss": 2.0, "step": 1},
                                                                         {"loss": 1.25, "step": 3}]}))
    [info] = list_checkpoints(tmp_path / "out")
    assert (info.step, info.epoch, info.loss) == (3, 1.5, 1.25) and info.created_at.endswith("+00:00")
    cases = [
        (dict(fmt="merged_4bit"), "export_format", "CUDA"),
        (dict(fmt="loha"), "export_format", "LoRA"),
        (dict(fmt="onnx"), "export_format", "gguf_lora"),
        (dict(fmt="gguf_lora", q="q4_k_m"), "quantization_method", "q8_0"),
        (dict(fmt="gguf", q="q9"), "quantization_method", "q4_k_m"),
        (dict(fmt="lora", q="q8_0"), "quantization_method", "does not apply"),
        (dict(fmt="gguf_lora", out=str(ckpt / "adapter_config.json")), "output_path", ".gguf"),
        (dict(fmt="gguf_lora"), "model", "base model"),
        (dict(ckpt=str(tmp_path)), "checkpoint_path", "adapter_config.json"),
        (dict(out=""), "output_path", "where"),
        (dict(options={"x": "1"}), "extra_options", "none"),
    ]
    for case, field, words in cases:
        with pytest.raises(InvalidArgument) as e:
            plan_export(case.get("ckpt", str(ckpt)), case.get("out", str(tmp_path / "exp")), case.get("fmt", "lora"),
                        case.get("q", ""), "", case.get("options", {}))
        assert e.value.field == field and words in str(e.value), (case, e.value)
    with pytest.raises(NotFound):
        plan_export(str(tmp_path / "nope"), str(tmp_path / "e"), "lora", "", "", {})
    p = plan_export(str(ckpt), str(tmp_path / "exp"), "lora", "", "", {})
    assert p["format"] == "lora" and Path(p["output"]).is_dir()
