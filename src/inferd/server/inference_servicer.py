"""Seed 002's ``inference.Inference`` service: a thin front over the same backend runtime.

Each method translates its message into the Backend contract and calls the runtime,
which applies the same calling rules (capabilities, locks, threads, cancellation) as
``backend.Backend``; failures leave through the one status map. Nothing here
generates text, embeds or draws itself:

* ChatStream / GenerateStream -> PredictStream (chat template for chat); deltas come
  from the backend's parsed ``chat_deltas``; a last message carries ``done``, the
  finish reason and usage.
* GetEmbedding -> one Embedding call per text, issued together (backends batch them).
* GenerateImage / EditImage -> GenerateImage run as a tracked job (``ImageJobs``);
  a backend without image generation answers UNIMPLEMENTED naming itself.
* ClearMemory / GetMemoryStats / ManageVRAM -> Free, LoadModel and Status plus
  process/system/GPU memory; ManageVRAM also pushes a report whenever the model is
  loaded or unloaded by anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc
import psutil
from google.protobuf import json_format

from inferd.backends.context import CallContext
from inferd.backends.memory import release_memory
from inferd.errors import InvalidArgument, NoModelLoaded, NotFound, ResourceExhausted, Unsupported
from inferd.limits import parse_json
from inferd.proto import backend_pb2 as pb
from inferd.proto import inference_pb2 as ipb
from inferd.proto import inference_pb2_grpc
from inferd.replies import finish_reason, text_delta
from inferd.runtime import BackendRuntime
from inferd.server.status_map import to_status

log = logging.getLogger("inferd.server.inference")

INFERENCE_SERVICE_NAME = "inference.Inference"
MAX_JOBS = 1000  # finished image jobs remembered for CheckImageStatus
MAX_PENDING_JOBS = 64  # queued + running image jobs; more are refused with RESOURCE_EXHAUSTED
MAX_TEXTS = 2048


def _ctx(rpc: str, context: grpc.aio.ServicerContext) -> CallContext:
    remaining = context.time_remaining()
    deadline = time.monotonic() + remaining if remaining is not None else None
    metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    return CallContext(rpc, metadata=metadata, deadline=deadline)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, rpc: str) -> None:
    code, message = to_status(exc, rpc)
    await context.abort(code, message)


def _sampling(params: ipb.SamplingParams, options: pb.PredictOptions) -> None:
    options.Tokens = params.max_tokens
    options.Temperature = params.temperature
    options.TopP = params.top_p
    options.TopK = params.top_k
    options.Seed = params.seed
    options.StopPrompts.extend(s for s in params.stop if s)
    options.Penalty = params.repeat_penalty
    options.PresencePenalty = params.presence_penalty
    options.FrequencyPenalty = params.frequency_penalty


def chat_options(request: ipb.ChatRequest) -> pb.PredictOptions:
    if not request.messages:
        raise InvalidArgument("must not be empty", "messages")
    options = pb.PredictOptions(
        Messages=[pb.Message(role=m.role, content=m.content, name=m.name, tool_call_id=m.tool_call_id)
                  for m in request.messages],
        UseTokenizerTemplate=True, Tools=request.tools, ToolChoice=request.tool_choice,
        Grammar=request.json_schema, CorrelationId=request.request_id or uuid.uuid4().hex)
    _sampling(request.params, options)
    return options


async def memory_report(runtime: BackendRuntime, event: str, success: bool = True,
                        message: str = "") -> ipb.MemoryReport:
    """Process, system and GPU memory plus the backend's own breakdown.

    The backend's probes (NVML, torch) run off the event loop, bounded, as for Status.
    """
    st = await runtime.status_async()
    vm = psutil.virtual_memory()
    breakdown = {k: max(0, int(v)) for k, v in st.memory.breakdown.items()}
    gpu_total = sum(v for k, v in breakdown.items() if k.startswith("gpu_") and k.endswith("_total"))
    gpu_used = sum(v for k, v in breakdown.items() if k.startswith("gpu_") and k.endswith(("_used", "_allocated")))
    backend = runtime.backend
    return ipb.MemoryReport(
        process_rss_bytes=psutil.Process().memory_info().rss, system_total_bytes=vm.total,
        system_available_bytes=vm.available, gpu_total_bytes=gpu_total, gpu_used_bytes=gpu_used,
        model_loaded=backend.loaded, model=backend.model_name if backend.loaded else "", backend=backend.name,
        breakdown=breakdown, event=event, success=success, message=message)


class ImageJobs:
    """Image generation jobs: each runs GenerateImage on the runtime as a task; states are kept."""

    def __init__(self, runtime: BackendRuntime) -> None:
        self.runtime = runtime
        self._jobs: OrderedDict[str, ipb.ImageJob] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    def submit(self, request: pb.GenerateImageRequest, ctx_metadata: dict[str, str]) -> ipb.ImageJob:
        backend = self.runtime.backend
        if not backend.supports("GenerateImage"):
            raise Unsupported(backend.name, "GenerateImage",
                              "serve an image backend (a diffusion model) to generate or edit images")
        if not backend.loaded and getattr(backend, "needs_model", True):
            raise NoModelLoaded(backend.name, "GenerateImage")
        pending = sum(1 for j in self._jobs.values() if j.state in (ipb.ImageJob.QUEUED, ipb.ImageJob.RUNNING))
        if pending >= MAX_PENDING_JOBS:
            raise ResourceExhausted(f"{pending} image jobs are queued or running (bound {MAX_PENDING_JOBS}); "
                                    "retry later")
        job_id = f"img-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if not request.dst:
            request.dst = os.path.join(tempfile.gettempdir(), f"inferd-{job_id}.png")
        job = ipb.ImageJob(job_id=job_id, state=ipb.ImageJob.QUEUED, created_at=time.time())
        self._jobs[job_id] = job
        while len(self._jobs) > MAX_JOBS:
            oldest = next(iter(self._jobs))
            if self._jobs[oldest].state in (ipb.ImageJob.QUEUED, ipb.ImageJob.RUNNING):
                break
            self._jobs.popitem(last=False)
        task = asyncio.get_running_loop().create_task(self._run(job_id, request, ctx_metadata))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        snapshot = ipb.ImageJob()
        snapshot.CopyFrom(job)
        return snapshot

    async def _run(self, job_id: str, request: pb.GenerateImageRequest, metadata: dict[str, str]) -> None:
        job = self._jobs[job_id]
        job.state = ipb.ImageJob.RUNNING
        try:
            result = await self.runtime.unary("GenerateImage", request, CallContext("GenerateImage",
                                                                                    metadata=metadata))
            if result.success:
                job.state, job.output_path = ipb.ImageJob.SUCCEEDED, request.dst
            else:
                job.state, job.error = ipb.ImageJob.FAILED, result.message or "generation failed"
        except Exception as exc:  # noqa: BLE001 - the job records why it failed
            job.state, job.error = ipb.ImageJob.FAILED, to_status(exc, "GenerateImage")[1]
        job.finished_at = time.time()

    def get(self, job_id: str) -> ipb.ImageJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no image job {job_id!r} (unknown or forgotten after {MAX_JOBS} newer jobs)")
        return job


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """Seed 002's service over one ``BackendRuntime`` (see the module docstring)."""

    def __init__(self, runtime: BackendRuntime) -> None:
        self.runtime = runtime
        self.jobs = ImageJobs(runtime)
        self._sessions: set[asyncio.Queue[ipb.MemoryReport]] = set()
        runtime.add_model_listener(self._model_changed)

    def add_to(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServicer_to_server(self, server)

    # ---- generation ---------------------------------------------------------------------
    async def _generate(self, rpc: str, options: pb.PredictOptions,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Reply]:
        stream = self.runtime.stream("PredictStream", options, _ctx("PredictStream", context))
        try:
            async for reply in stream:
                yield reply
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await _abort(context, exc, rpc)
        finally:
            await stream.aclose()

    async def ChatStream(self, request: ipb.ChatRequest,  # noqa: N802 - the seed's method names
                         context: grpc.aio.ServicerContext) -> AsyncIterator[ipb.ChatResponse]:
        try:
            options = chat_options(request)
        except InvalidArgument as exc:
            await _abort(context, exc, "ChatStream")
        last, calls = None, False
        async for reply in self._generate("ChatStream", options, context):
            last = reply
            d = text_delta(reply)
            calls = calls or bool(d.tool_calls)
            if d.content or d.reasoning or d.tool_calls:
                yield ipb.ChatResponse(content=d.content, reasoning=d.reasoning, tool_calls=[
                    ipb.ToolCall(index=t.index, id=t.id, name=t.name, arguments=t.arguments) for t in d.tool_calls])
        yield ipb.ChatResponse(done=True, finish_reason=finish_reason(last.tokens if last else 0, options.Tokens, calls),
                               usage=_usage(last))

    async def GenerateStream(self, request: ipb.GenerateRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> AsyncIterator[ipb.GenerateResponse]:
        if not request.prompt:
            await _abort(context, InvalidArgument("must not be empty", "prompt"), "GenerateStream")
        options = pb.PredictOptions(Prompt=request.prompt, CorrelationId=request.request_id or uuid.uuid4().hex)
        _sampling(request.params, options)
        last = None
        async for reply in self._generate("GenerateStream", options, context):
            last = reply
            if reply.message:
                yield ipb.GenerateResponse(text=reply.message.decode("utf-8", "replace"))
        yield ipb.GenerateResponse(done=True, finish_reason=finish_reason(last.tokens if last else 0,
                                                                          options.Tokens, False), usage=_usage(last))

    async def GetEmbedding(self, request: ipb.EmbeddingRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> ipb.EmbeddingResponse:
        try:
            if not request.texts:
                raise InvalidArgument("must not be empty", "texts")
            if len(request.texts) > MAX_TEXTS:
                raise InvalidArgument(f"at most {MAX_TEXTS} texts per call, got {len(request.texts)}", "texts")
            for i, t in enumerate(request.texts):
                if not t:
                    raise InvalidArgument("must not be empty", f"texts[{i}]")
            results = await asyncio.gather(*(
                self.runtime.unary("Embedding", pb.PredictOptions(Embeddings=t), _ctx("Embedding", context))
                for t in request.texts))
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, "GetEmbedding")
        vectors = [ipb.Embedding(values=r.embeddings) for r in results]
        return ipb.EmbeddingResponse(embeddings=vectors, dimensions=len(vectors[0].values) if vectors else 0)

    # ---- images -----------------------------------------------------------------------------
    def _image_request(self, image: ipb.ImageRequest, src: str = "") -> pb.GenerateImageRequest:
        if not image.prompt:
            raise InvalidArgument("must not be empty", "prompt")
        for name in ("width", "height", "steps"):
            if getattr(image, name) < 0:
                raise InvalidArgument(f"must be >= 0, got {getattr(image, name)}", name)
        return pb.GenerateImageRequest(positive_prompt=image.prompt, negative_prompt=image.negative_prompt,
                                       width=image.width, height=image.height, step=image.steps, seed=image.seed,
                                       dst=image.output_path, src=src)

    async def GenerateImage(self, request: ipb.ImageRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> ipb.ImageJob:
        try:
            return self.jobs.submit(self._image_request(request), _ctx("GenerateImage", context).metadata)
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, "GenerateImage")

    async def EditImage(self, request: ipb.EditImageRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> ipb.ImageJob:
        try:
            if not request.source_path:
                raise InvalidArgument("must name the image to edit", "source_path")
            return self.jobs.submit(self._image_request(request.image, request.source_path),
                                    _ctx("EditImage", context).metadata)
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, "EditImage")

    async def CheckImageStatus(self, request: ipb.ImageStatusRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> ipb.ImageJob:
        try:
            return self.jobs.get(request.job_id)
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, "CheckImageStatus")

    # ---- memory -----------------------------------------------------------------------------
    async def _clear(self, context: grpc.aio.ServicerContext | None) -> pb.Result:
        ctx = CallContext("Free") if context is None else _ctx("Free", context)
        result = await self.runtime.free(ctx)
        await asyncio.to_thread(release_memory)
        return result

    async def ClearMemory(self, request: ipb.ClearMemoryRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> ipb.MemoryReport:
        try:
            result = await self._clear(context)
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, "ClearMemory")
        return await memory_report(self.runtime, "cleared", result.success, result.message)

    async def GetMemoryStats(self, request: ipb.MemoryStatsRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> ipb.MemoryReport:
        return await memory_report(self.runtime, "stats")

    async def ManageVRAM(self, request_iterator: AsyncIterator[ipb.VRAMCommand],  # noqa: N802
                         context: grpc.aio.ServicerContext) -> AsyncIterator[ipb.MemoryReport]:
        queue: asyncio.Queue[ipb.MemoryReport | asyncio.Task[ipb.MemoryReport] | None] = asyncio.Queue()
        self._sessions.add(queue)  # type: ignore[arg-type]

        async def read_commands() -> None:
            try:
                async for command in request_iterator:
                    await queue.put(await self._command(command))
            finally:
                await queue.put(None)

        reader = asyncio.get_running_loop().create_task(read_commands())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                yield (await item) if isinstance(item, asyncio.Task) else item
            await reader  # surfaces a failure of the command stream
        finally:
            self._sessions.discard(queue)  # type: ignore[arg-type]
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def _command(self, command: ipb.VRAMCommand) -> ipb.MemoryReport:
        """One ManageVRAM command; a failure is reported in the report, the session goes on."""
        A = ipb.VRAMCommand  # noqa: N806
        try:
            if command.action == A.STATS:
                return await memory_report(self.runtime, "stats")
            if command.action in (A.CLEAR, A.UNLOAD):
                result = await (self._clear(None) if command.action == A.CLEAR
                                else self.runtime.free(CallContext("Free")))
                return await memory_report(self.runtime, "cleared" if command.action == A.CLEAR else "unloaded",
                                     result.success, result.message)
            if command.action == A.LOAD:
                options = pb.ModelOptions()
                if command.options_json:
                    # bounded parse first: deep nesting would be a RecursionError (INTERNAL) in json_format
                    data = parse_json(command.options_json, "options_json")
                    try:
                        json_format.ParseDict(data, options)
                    except (json_format.ParseError, AttributeError, TypeError, ValueError) as exc:
                        raise InvalidArgument(f"not a ModelOptions JSON: {exc}", "options_json") from None
                if command.model:
                    options.Model = command.model
                result = await self.runtime.load_model(options, CallContext("LoadModel"))
                return await memory_report(self.runtime, "loaded", result.success, result.message)
            raise InvalidArgument(f"unknown action {command.action}", "action")
        except Exception as exc:  # noqa: BLE001 - reported, not fatal to the session
            code, message = to_status(exc, "ManageVRAM")
            return await memory_report(self.runtime, "error", False, f"{code.name}: {message}")

    def _model_changed(self, loaded: bool) -> None:
        """Push a report to every open ManageVRAM session (called by the runtime on load/free)."""
        if not self._sessions:
            return
        # called on the loop by the runtime, mid LoadModel/Free: the report is measured by a task and
        # queued now as that task, so sessions still see it before the command's own answer
        report = asyncio.get_running_loop().create_task(
            memory_report(self.runtime, "changed", True, json.dumps({"model_loaded": loaded})))
        for q in list(self._sessions):
            q.put_nowait(report)


def _usage(reply: pb.Reply | None) -> ipb.Usage:
    if reply is None:
        return ipb.Usage()
    tps = reply.tokens / (reply.timing_token_generation / 1000.0) if reply.timing_token_generation > 0 else 0.0
    return ipb.Usage(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.tokens, tokens_per_second=tps)


def inference_handlers(runtime: BackendRuntime) -> list[grpc.GenericRpcHandler]:
    """The service's handlers for ``server.app``, requests parsed in the handler (``server.decoding``)."""
    from inferd.server.decoding import decoding_handlers

    servicer = InferenceServicer(runtime)
    return list(decoding_handlers(lambda target: servicer.add_to(target)))
