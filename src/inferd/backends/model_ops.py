"""Model operations (LocalAI's model-building rpcs) as a backend mixin: protobuf <-> jobs.

StartQuantization / QuantizationProgress / StopQuantization and StartFineTune /
FineTuneProgress / StopFineTune / ListCheckpoints / ExportModel. The work lives in
``inferd.engines.jobs`` (child processes, progress, stop), ``engines.quantize`` and
``engines.finetune``; this module only validates through them and translates.

Why a mixin on ``llama-cpp`` rather than a backend of its own: LocalAI sends these rpcs to
the backend that serves the model (``llama-cpp`` for GGUF), and a job needs no loaded model,
so the same server quantizes a model, fine-tunes it and serves the result. The jobs keep
running while the backend serves (the Start calls only spawn a process; the Progress rpcs
are ungated), so ``Status`` stays READY and shows the jobs in its memory breakdown.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from inferd.backends.context import CallContext
from inferd.engines import finetune, quantize
from inferd.engines.jobs import COMPLETED, Job, JobRunner, new_job_id
from inferd.errors import FailedPrecondition, InvalidArgument, NotFound
from inferd.paths import confine
from inferd.proto import backend_pb2 as pb

_RUNNER_LOCK = threading.Lock()


def progress_message(cls: Any, snapshot: dict[str, Any]) -> Any:
    """A progress snapshot -> ``cls`` (only the fields it has; metrics as floats)."""
    fields = cls.DESCRIPTOR.fields_by_name
    plain = {k: v for k, v in snapshot.items() if k in fields and k != "extra_metrics" and v is not None}
    message = cls(**plain)
    for key, value in (snapshot.get("extra_metrics") or {}).items():
        message.extra_metrics[str(key)] = float(value)
    return message


class ModelOpsMixin:
    """The eight model-operation rpcs; mix in before ``Backend``. Needs ``self.settings``."""

    settings: Any

    # ---- shared plumbing ---------------------------------------------------------------
    @property
    def jobs(self) -> JobRunner:
        runner = self.__dict__.get("_job_runner")
        if runner is None:
            with _RUNNER_LOCK:
                spares = (quantize.TASK,) if getattr(self.settings, "job_spare", True) else ()
                runner = self.__dict__.setdefault("_job_runner", JobRunner(max_running=1, spares=spares))
        return runner

    @property
    def models_dir(self) -> str | None:
        return getattr(self.settings, "models_dir", None) or None

    def _job(self, job_id: str, kind: str) -> Job:
        try:
            job = self.jobs.get(job_id)
        except NotFound:
            job = None
        if job is None or job.kind != kind:
            what = {"quantize": "quantization", "finetune": "fine-tuning"}[kind]
            raise NotFound(f"no {what} job with id {job_id!r}")
        return job

    async def _watch(self, job: Job, cls: Any) -> AsyncIterator[Any]:
        async for snapshot in job.watch():
            yield progress_message(cls, snapshot)

    def memory(self) -> tuple[int, dict[str, int]]:
        total, breakdown = super().memory()  # type: ignore[misc]
        runner = self.__dict__.get("_job_runner")
        if runner is not None:
            breakdown.update(runner.breakdown())
        return total, breakdown

    # ---- quantization ---------------------------------------------------------------------
    def start_quantization(self, request: pb.QuantizationRequest, ctx: CallContext) -> pb.QuantizationJobResult:
        job_id = new_job_id(request.job_id)
        plan = quantize.plan_quantization(request.model, request.quantization_type, request.output_dir,
                                          job_id, dict(request.extra_options), self.models_dir)
        log_path = plan.output.parent / f"{job_id}.quantize.log"
        self.jobs.submit("quantize", quantize.TASK, plan.params, job_id=job_id, log_path=log_path,
                         cleanup=[plan.partial, Path(plan.params["converted"])], kill_on_stop=True,
                         start_status="converting" if plan.source.is_dir() else "quantizing")
        return pb.QuantizationJobResult(
            job_id=job_id, success=True,
            message=f"quantizing {plan.source.name} to {plan.type_name} -> {plan.output} (log {log_path})")

    async def quantization_progress(self, request: pb.QuantizationProgressRequest,
                                    ctx: CallContext) -> AsyncIterator[pb.QuantizationProgressUpdate]:
        job = self._job(request.job_id, "quantize")
        async for update in self._watch(job, pb.QuantizationProgressUpdate):
            yield update

    def stop_quantization(self, request: pb.QuantizationStopRequest, ctx: CallContext) -> pb.Result:
        job = self._job(request.job_id, "quantize")
        return self._stop(job, False)

    # ---- fine-tuning ----------------------------------------------------------------------
    def start_fine_tune(self, request: pb.FineTuneRequest, ctx: CallContext) -> pb.FineTuneJobResult:
        require_training_stack("StartFineTune")
        job_id = new_job_id(request.job_id)
        params = finetune.plan_finetune(request_fields(request), job_id, self.models_dir)
        log_path = Path(params["output_dir"]) / f"{job_id}.finetune.log"
        self.jobs.submit("finetune", finetune.TASK, params, job_id=job_id, log_path=log_path,
                         start_status="loading_model")
        counts = ", ".join(f"{n} {k}" for k, n in params["dataset_counts"].items() if n)
        return pb.FineTuneJobResult(
            job_id=job_id, success=True,
            message=f"LoRA fine-tuning of {Path(params['model']).name} on {counts} record(s) queued; "
                    f"output {params['output_dir']} (log {log_path})")

    async def fine_tune_progress(self, request: pb.FineTuneProgressRequest,
                                 ctx: CallContext) -> AsyncIterator[pb.FineTuneProgressUpdate]:
        job = self._job(request.job_id, "finetune")
        async for update in self._watch(job, pb.FineTuneProgressUpdate):
            yield update

    def stop_fine_tune(self, request: pb.FineTuneStopRequest, ctx: CallContext) -> pb.Result:
        job = self._job(request.job_id, "finetune")
        return self._stop(job, request.save_checkpoint)

    def list_checkpoints(self, request: pb.ListCheckpointsRequest, ctx: CallContext) -> pb.ListCheckpointsResponse:
        if not request.output_dir:
            raise InvalidArgument("must name a fine-tuning output directory", "output_dir")
        output_dir = confine(request.output_dir, self.models_dir, "output_dir")
        if not output_dir.is_dir():
            raise NotFound(f"output_dir: {request.output_dir!r} is not a directory")
        return pb.ListCheckpointsResponse(checkpoints=[
            pb.CheckpointInfo(path=c.path, step=c.step, epoch=c.epoch, loss=c.loss, created_at=c.created_at)
            for c in finetune.list_checkpoints(output_dir)])

    def export_model(self, request: pb.ExportModelRequest, ctx: CallContext) -> pb.Result:
        params = finetune.plan_export(request.checkpoint_path, request.output_path, request.export_format,
                                      request.quantization_method, request.model, dict(request.extra_options),
                                      self.models_dir)
        if params["format"] == "lora":
            copied = finetune.copy_adapter(Path(params["checkpoint"]), Path(params["output"]))
            return pb.Result(success=True, message=f"copied {', '.join(copied)} to {params['output']}")
        require_training_stack("ExportModel")
        job_id = f"export-{new_job_id('')}"
        output = Path(params["output"])
        log_path = (output.parent if output.suffix else output) / f"{job_id}.log"
        job = self.jobs.submit("export", finetune.EXPORT_TASK, params, job_id=job_id, log_path=log_path,
                               queue=False, start_status="saving")
        while not job.wait(0.2):
            if ctx.cancelled():
                self.jobs.stop(job.id)
        if job.status == COMPLETED:
            return pb.Result(success=True, message=str(job.snapshot.get("message", "exported")))
        return pb.Result(success=False, message=f"export {job.status}: {job.snapshot.get('message', '')}")

    def _stop(self, job: Job, save_checkpoint: bool) -> pb.Result:
        if job.finished:
            return pb.Result(success=True, message=f"job {job.id} had already ended: {job.status}")
        self.jobs.stop(job.id, save_checkpoint)
        return pb.Result(success=True, message=f"stopping job {job.id}"
                         + (" (saving a checkpoint first)" if save_checkpoint else ""))


def require_training_stack(rpc: str) -> None:
    """FailedPrecondition (with the fix) when the finetune extra is not installed."""
    missing = [m for m in ("torch", "transformers", "peft", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise FailedPrecondition(f"{rpc} needs {', '.join(missing)}: install the finetune extra "
                                 "(pip install 'inferd[finetune]' or scripts/setup_env.sh --test)")


def request_fields(message: Any) -> dict[str, Any]:
    """A request's fields as plain Python values (repeated -> list, map -> dict)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = dict(value)
        elif getattr(field, "is_repeated", None) or getattr(field, "label", None) == 3:  # protobuf 7 / older
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


__all__ = ["ModelOpsMixin", "progress_message", "request_fields"]
