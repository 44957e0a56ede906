"""The ``llama-cpp`` backend: LocalAI's Backend protocol over the llama.cpp engine.

This module only translates: ModelOptions -> ``ModelConfig``, PredictOptions ->
``SamplingParams`` + prompt tokens, engine outputs -> ``Reply``; engine exceptions ->
``inferd.errors``. Generation itself runs on the engine's scheduler thread
(``inferd.engines.llama.scheduler``), which batches every concurrent request into one
``llama_decode`` per step. That is why ``predict``/``predict_stream`` are ``async``:
they hand the request to the scheduler and await its outputs through an asyncio
queue, so a hundred open streams hold no worker threads.

What each ModelOptions / PredictOptions field does (and which are ignored, and why)
is documented in docs/llama-cpp.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from inferd.backends.base import Backend
from inferd.backends.context import CallContext
from inferd.backends.options import option_bool, option_int, split_options
from inferd.engines.llama import (
    Completion,
    EngineClosed,
    KVCacheFull,
    LlamaModel,
    ModelConfig,
    ModelLoadError,
    PromptTooLong,
    QueueFull,
    SamplerError,
    SamplingParams,
    Scheduler,
    StepOutput,
    default_model_path,
)
from inferd.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    LoadError,
    NoModelLoaded,
    ResourceExhausted,
)
from inferd.proto import backend_pb2 as pb

log = logging.getLogger("inferd.backends.llama_cpp")

DEFAULT_SLOTS = 4
DEFAULT_MAX_WAITING = 64
MAX_TOP_LOGPROBS = 20


def _parse_bool(key: str, value: str) -> bool:
    return option_bool(key, value, empty=True)


def _parse_int(key: str, value: str, minimum: int) -> int:
    return option_int(key, value, minimum)


class LoadPlan:
    """ModelOptions resolved into an engine config plus backend-level settings."""

    def __init__(self) -> None:
        self.config: ModelConfig | None = None
        self.chat_template: str | None = None
        self.max_waiting = DEFAULT_MAX_WAITING
        self.ignored: list[str] = []


def resolve_model_path(options: pb.ModelOptions) -> str:
    """LocalAI's ways of naming the file: ModelFile, ModelPath + Model, Model as a path.

    An empty Model and ModelFile means the packaged default (SmolLM2-135M-Instruct).
    """
    if options.ModelFile:
        if os.path.isfile(options.ModelFile) or not options.Model:
            return options.ModelFile
    if options.Model:
        if os.path.isabs(options.Model) or os.path.exists(options.Model) or not options.ModelPath:
            return options.Model
        return os.path.join(options.ModelPath, options.Model)
    if options.ModelFile:
        return options.ModelFile
    try:
        return default_model_path()
    except ModelLoadError as exc:
        raise LoadError(str(exc)) from None


def plan_load(options: pb.ModelOptions, env: dict[str, str] | None = None) -> LoadPlan:
    """Map every ModelOptions field llama.cpp honours onto ``ModelConfig``."""
    env = dict(os.environ) if env is None else env
    plan = LoadPlan()
    path = resolve_model_path(options)

    def rel(p: str) -> str:
        return p if os.path.isabs(p) or not options.ModelPath else os.path.join(options.ModelPath, p)

    lora: list[tuple[str, float]] = []
    if options.LoraAdapter:
        lora.append((rel(options.LoraAdapter), options.LoraScale or 1.0))
    for i, adapter in enumerate(options.LoraAdapters):
        scale = options.LoraScales[i] if i < len(options.LoraScales) else 1.0
        lora.append((rel(adapter), scale))

    slots = DEFAULT_SLOTS
    if env.get("LLAMACPP_PARALLEL"):
        slots = _parse_int("LLAMACPP_PARALLEL", env["LLAMACPP_PARALLEL"], 1)
    extra: dict[str, Any] = {}
    for key, value, raw in split_options(options.Options):
        if key in ("parallel", "slots", "n_parallel", "np"):
            slots = _parse_int(key, value, 1)
        elif key in ("use_jinja", "jinja"):
            _parse_bool(key, value)  # always jinja2; validated so typos surface
        elif key == "chat_template":
            tmpl = value
            if tmpl and "{" not in tmpl and os.path.isfile(rel(tmpl)):
                with open(rel(tmpl), encoding="utf-8") as f:
                    tmpl = f.read()
            plan.chat_template = tmpl or None
        elif key in ("queue", "max_queue", "max_waiting"):
            plan.max_waiting = _parse_int(key, value, 0)
        elif key in ("n_ubatch", "ubatch", "ubatch_size"):
            extra["n_ubatch"] = _parse_int(key, value, 1)
        elif key in ("threads_batch", "n_threads_batch"):
            extra["threads_batch"] = _parse_int(key, value, 1)
        elif key in ("kv_unified", "unified_kv"):
            extra["kv_unified"] = _parse_bool(key, value)
        elif key == "swa_full":
            extra["swa_full"] = _parse_bool(key, value)
        elif key in ("flash_attn", "flash_attention"):
            extra["flash_attn"] = value.strip()
        else:
            plan.ignored.append(raw)

    config = ModelConfig(
        path=path,
        n_ctx=options.ContextSize if options.ContextSize > 0 else 4096,
        n_batch=options.NBatch if options.NBatch > 0 else 2048,
        slots=slots,
        threads=max(0, options.Threads),
        n_gpu_layers=options.NGPULayers,
        main_gpu=int(options.MainGPU) if options.MainGPU.strip().isdigit() else 0,
        use_mmap=options.MMap,
        use_mlock=options.MLock,
        flash_attn=options.FlashAttention or "auto",
        cache_type_k=options.CacheTypeKey,
        cache_type_v=options.CacheTypeValue,
        offload_kqv=not options.NoKVOffload,
        rope_freq_base=options.RopeFreqBase,
        rope_freq_scale=options.RopeFreqScale,
        rope_scaling=options.RopeScaling,
        yarn_ext_factor=options.YarnExtFactor if options.YarnExtFactor else -1.0,
        yarn_attn_factor=options.YarnAttnFactor if options.YarnAttnFactor else -1.0,
        yarn_beta_fast=options.YarnBetaFast if options.YarnBetaFast else -1.0,
        yarn_beta_slow=options.YarnBetaSlow if options.YarnBetaSlow else -1.0,
        embeddings=options.Embeddings,
        lora=lora,
        kv_overrides=list(options.Overrides),
        seed=options.Seed if options.Seed else -1,
    )
    for key, value in extra.items():
        setattr(config, key, value)
    plan.config = config
    return plan


# ---- PredictOptions -> engine types -------------------------------------------------------
def parse_logit_bias(raw: str, tokenize: Any) -> dict[int, float]:
    """OpenAI ``logit_bias``: {"token id" or "text": bias}; a text key biases all its tokens.

    ``false`` bans a token (-inf), as llama-server accepts.
    """
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"not valid JSON: {exc}", "LogitBias") from None
    if not isinstance(data, dict):
        raise InvalidArgument("must be a JSON object mapping token ids to biases", "LogitBias")
    out: dict[int, float] = {}
    for key, value in data.items():
        if value is False:
            bias = float("-inf")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            bias = float(value)
        else:
            raise InvalidArgument(f"bias for {key!r} must be a number or false, got {value!r}", "LogitBias")
        try:
            ids = [int(key)]
        except ValueError:
            ids = tokenize(key)
        for t in ids:
            out[t] = bias
    return out


def parse_grammar(raw: str) -> str:
    """GBNF as is; a JSON schema (text starting with ``{``) is converted to GBNF."""
    text = raw.strip()
    if not text:
        return ""
    if text.startswith("{"):
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        try:
            return json_schema_to_gbnf(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"looks like a JSON schema but is not valid JSON: {exc}", "Grammar") from None
        except Exception as exc:  # noqa: BLE001 - the converter raises assorted errors
            raise InvalidArgument(f"cannot convert the JSON schema to a grammar: {exc}", "Grammar") from None
    return raw


def sampling_params(request: pb.PredictOptions, tokenize: Any, default_seed: int = -1) -> SamplingParams:
    """Validate PredictOptions and build SamplingParams; raises InvalidArgument(field)."""
    r = request
    checks = (
        (r.Tokens < 0, "Tokens", f"must be >= 0, got {r.Tokens}"),
        (r.TopK < 0, "TopK", f"must be >= 0, got {r.TopK}"),
        (not 0.0 <= r.TopP <= 1.0, "TopP", f"must be between 0 and 1, got {r.TopP}"),
        (not 0.0 <= r.MinP <= 1.0, "MinP", f"must be between 0 and 1, got {r.MinP}"),
        (not 0.0 <= r.TypicalP <= 1.0, "TypicalP", f"must be between 0 and 1, got {r.TypicalP}"),
        (r.Temperature < 0, "Temperature", f"must be >= 0, got {r.Temperature}"),
        (r.Penalty < 0, "Penalty", f"must be >= 0, got {r.Penalty}"),
        (r.Repeat < -1, "Repeat", f"must be >= -1, got {r.Repeat}"),
        (r.Mirostat not in (0, 1, 2), "Mirostat", f"must be 0, 1 or 2, got {r.Mirostat}"),
        (r.MirostatTAU < 0, "MirostatTAU", f"must be >= 0, got {r.MirostatTAU}"),
        (r.MirostatETA < 0, "MirostatETA", f"must be >= 0, got {r.MirostatETA}"),
        (r.NKeep < -1, "NKeep", f"must be >= -1, got {r.NKeep}"),
        (r.Logprobs < 0, "Logprobs", f"must be >= 0, got {r.Logprobs}"),
        (not 0 <= r.TopLogprobs <= MAX_TOP_LOGPROBS, "TopLogprobs",
         f"must be between 0 and {MAX_TOP_LOGPROBS}, got {r.TopLogprobs}"),
    )
    for bad, field, message in checks:
        if bad:
            raise InvalidArgument(message, field)
    for field in ("Images", "Videos", "Audios"):
        if len(getattr(r, field)):
            raise InvalidArgument("this model is text-only (no multimodal projector loaded)", field)
    seed = r.Seed if r.Seed != 0 else default_seed
    want_logprobs = r.Logprobs > 0 or r.TopLogprobs > 0
    return SamplingParams(
        max_tokens=r.Tokens,
        temperature=r.Temperature,
        top_k=r.TopK,
        top_p=r.TopP if r.TopP > 0 else 1.0,
        min_p=r.MinP,
        typical_p=r.TypicalP if r.TypicalP > 0 else 1.0,
        repeat_penalty=r.Penalty if r.Penalty > 0 else 1.0,
        repeat_last_n=r.Repeat if r.Repeat != 0 else 64,
        frequency_penalty=r.FrequencyPenalty,
        presence_penalty=r.PresencePenalty,
        mirostat=r.Mirostat,
        mirostat_tau=r.MirostatTAU if r.MirostatTAU > 0 else 5.0,
        mirostat_eta=r.MirostatETA if r.MirostatETA > 0 else 0.1,
        seed=seed,
        stop=[s for s in r.StopPrompts if s],
        ignore_eos=r.IgnoreEOS,
        n_keep=r.NKeep,
        logit_bias=parse_logit_bias(r.LogitBias, tokenize),
        grammar=parse_grammar(r.Grammar),
        logprobs=min(r.TopLogprobs or r.Logprobs, MAX_TOP_LOGPROBS) if want_logprobs else 0,
        want_logprobs=want_logprobs,
    )


def _parse_json_field(raw: str, field: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"not valid JSON: {exc}", field) from None


def _messages(request: pb.PredictOptions) -> list[dict[str, Any]]:
    items = [
        {
            "role": m.role, "content": m.content, "name": m.name, "tool_call_id": m.tool_call_id,
            "reasoning_content": m.reasoning_content, "tool_calls": m.tool_calls,
        }
        for m in request.Messages
    ]
    from inferd.engines.llama import chat_template

    convert = getattr(chat_template, "messages_from_proto_fields", None)
    try:
        if convert is not None:
            return list(convert(items))
    except ValueError as exc:
        raise InvalidArgument(str(exc), "Messages") from None
    out = []
    for i, item in enumerate(items):
        msg = {k: v for k, v in item.items() if v and k != "tool_calls"}
        msg.setdefault("content", "")
        if item["tool_calls"]:
            msg["tool_calls"] = _parse_json_field(item["tool_calls"], f"Messages[{i}].tool_calls")
        out.append(msg)
    return out


def _tools(request: pb.PredictOptions) -> list[dict[str, Any]] | None:
    """Tools after ToolChoice: "none" drops them, a named function keeps only that one."""
    if not request.Tools.strip():
        return None
    tools = _parse_json_field(request.Tools, "Tools")
    if not isinstance(tools, list):
        raise InvalidArgument("must be a JSON array of tools", "Tools")
    choice_raw = request.ToolChoice.strip()
    if choice_raw:
        try:
            choice = json.loads(choice_raw)
        except json.JSONDecodeError:
            choice = choice_raw  # LocalAI may send a bare word: auto, none, required
        if choice == "none":
            return None
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") or choice.get("name")
            if name:
                tools = [t for t in tools if (t.get("function") or {}).get("name") == name]
                if not tools:
                    raise InvalidArgument(f"names tool {name!r}, which is not in Tools", "ToolChoice")
    return tools or None


def _enable_thinking(request: pb.PredictOptions) -> bool | None:
    raw = request.Metadata.get("enable_thinking", "").strip().lower()
    if raw in ("true", "1", "yes", "on"):
        return True
    if raw in ("false", "0", "no", "off"):
        return False
    return None


class _Chat:
    """Per-request chat state: the output parser when the request was a chat."""

    def __init__(self, tools_enabled: bool, thinking: bool, id_salt: str) -> None:
        from inferd.engines.llama.tool_parser import ChatOutputParser

        self.tools_enabled = tools_enabled
        self.thinking = thinking
        self.id_salt = id_salt
        self.parser = ChatOutputParser(tools_enabled=tools_enabled, thinking=thinking, id_salt=id_salt)


def _chat_deltas_pb(deltas: list[Any]) -> list[pb.ChatDelta]:
    out = []
    for d in deltas:
        if not (d.content or d.reasoning_content or d.tool_calls):
            continue
        out.append(pb.ChatDelta(
            content=d.content,
            reasoning_content=d.reasoning_content,
            tool_calls=[pb.ToolCallDelta(index=t.index, id=t.id, name=t.name, arguments=t.arguments)
                        for t in d.tool_calls],
        ))
    return out


def _raise_for(completion: Completion) -> None:
    err = completion.error
    if completion.finish_reason == "cancelled":
        raise Cancelled("generation cancelled")
    if err is None:
        return
    if isinstance(err, EngineClosed):
        raise FailedPrecondition(f"generation stopped: {err}")
    if isinstance(err, KVCacheFull):
        raise ResourceExhausted(str(err))
    raise err


class LlamaCppBackend(Backend):
    """Text generation, chat, embeddings and tokenization on llama.cpp (GGUF models)."""

    name = "llama-cpp"
    parallel = True  # the scheduler serializes access to the model; calls only enqueue

    def __init__(self, settings: Any = None) -> None:
        super().__init__()
        self.settings = settings
        self.engine: LlamaModel | None = None
        self.scheduler: Scheduler | None = None
        self.template: Any = None
        self.default_seed = -1
        self.model_path = ""

    # ---- lifecycle ------------------------------------------------------------------------
    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        plan = plan_load(options)
        assert plan.config is not None
        try:
            engine = LlamaModel(plan.config)
        except ModelLoadError as exc:
            raise LoadError(str(exc)) from None
        try:
            from inferd.engines.llama.chat_template import ChatTemplate

            try:
                template = ChatTemplate.from_model(engine.metadata, plan.chat_template)
            except ValueError as exc:
                raise LoadError(f"chat template does not compile: {exc}") from None
            scheduler = Scheduler(engine, max_waiting=plan.max_waiting)
        except BaseException:
            engine.close()
            raise
        self.engine, self.scheduler, self.template = engine, scheduler, template
        self.default_seed = plan.config.seed
        self.model_path = plan.config.path
        if plan.ignored:
            log.info("llama-cpp: ignored options %s", plan.ignored)
        return (
            f"loaded {os.path.basename(plan.config.path)} ({engine.description()}): "
            f"n_ctx {engine.n_ctx}, slots {engine.n_seq_max}, threads {engine.threads}, "
            f"chat template from {template.source}"
        )

    def unload(self) -> None:
        scheduler, engine = self.scheduler, self.engine
        self.scheduler = self.engine = None
        self.template = None
        if scheduler is not None:
            scheduler.close()
        if engine is not None:
            engine.close()

    def memory(self) -> tuple[int, dict[str, int]]:
        total, breakdown = super().memory()
        if self.engine is not None and self.engine.model is not None:
            breakdown["llama_model_bytes"] = self.engine.size_bytes()
        return total, breakdown

    def _require(self, rpc: str) -> tuple[LlamaModel, Scheduler]:
        engine, scheduler = self.engine, self.scheduler
        if engine is None or scheduler is None:
            raise NoModelLoaded(self.name, rpc)
        return engine, scheduler

    # ---- request preparation ----------------------------------------------------------------
    def _prepare(self, request: pb.PredictOptions, rpc: str) -> tuple[list[int], SamplingParams, _Chat | None]:
        engine, _ = self._require(rpc)
        params = sampling_params(request, lambda s: engine.tokenize(s, False, True), self.default_seed)
        chat: _Chat | None = None
        if request.Messages and (request.UseTokenizerTemplate or not request.Prompt):
            messages = _messages(request)
            tools = _tools(request)
            thinking_flag = _enable_thinking(request)
            try:
                prompt = self.template.render(
                    messages, tools=tools, add_generation_prompt=True, enable_thinking=thinking_flag,
                    bos_token=engine.bos_text, eos_token=engine.eos_text,
                )
            except ValueError as exc:
                raise InvalidArgument(str(exc), "Messages") from None
            for s in getattr(self.template, "stop_strings", ()):
                if s not in params.stop:
                    params.stop.append(s)
            from inferd.engines.llama import chat_template

            opens = getattr(chat_template, "prompt_opens_thinking", None)
            thinking = bool(opens(prompt)) if opens is not None else False
            chat = _Chat(tools_enabled=bool(tools), thinking=thinking,
                         id_salt=request.CorrelationId or uuid.uuid4().hex)
            add_bos = engine.add_bos and not (engine.bos_text and prompt.startswith(engine.bos_text))
            tokens = engine.tokenize(prompt, add_special=add_bos, parse_special=True)
        else:
            tokens = engine.tokenize(request.Prompt, add_special=True, parse_special=True)
        if not tokens:
            raise InvalidArgument("the prompt is empty: give Prompt or Messages", "Prompt")
        return tokens, params, chat

    def _submit(
        self, request: pb.PredictOptions, ctx: CallContext, rpc: str
    ) -> tuple[list[int], _Chat | None, AsyncIterator[StepOutput]]:
        """Queue one generation; return its prompt tokens, chat state and its outputs.

        The outputs iterator ends after the completed output (raising for an error
        completion) and aborts the request in the scheduler if it is closed early, so
        callers must close it deterministically (``contextlib.aclosing``).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()

        def emit(out: StepOutput) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, out)

        tokens, params, chat = self._prepare(request, rpc)
        _, scheduler = self._require(rpc)
        try:
            req = scheduler.add(tokens, params, emit, ctx.cancelled)
        except PromptTooLong as exc:
            raise InvalidArgument(str(exc), "Prompt") from None
        except SamplerError as exc:
            raise InvalidArgument(str(exc), exc.field) from None
        except QueueFull as exc:
            raise ResourceExhausted(str(exc)) from None
        except EngineClosed as exc:
            raise FailedPrecondition(str(exc)) from None
        if request.CorrelationId:
            log.debug("request %d correlation id %s", req.id, request.CorrelationId)

        async def outputs() -> AsyncIterator[StepOutput]:
            finished = False
            try:
                while True:
                    out = await queue.get()
                    if out.completion is not None:
                        finished = True
                        _raise_for(out.completion)
                        yield out
                        return
                    yield out
            finally:
                if not finished:
                    scheduler.abort(req)

        return tokens, chat, outputs()

    # ---- Predict / PredictStream --------------------------------------------------------------
    async def predict_stream(self, request: pb.PredictOptions, ctx: CallContext) -> AsyncIterator[pb.Reply]:
        tokens, chat, outputs = self._submit(request, ctx, "PredictStream")
        n_gen = 0
        async with contextlib.aclosing(outputs):
            async for out in outputs:
                n_gen += len(out.token_ids)
                done = out.completion
                reply = pb.Reply(message=out.text.encode("utf-8"), tokens=n_gen, prompt_tokens=len(tokens))
                if out.logprobs:
                    reply.logprobs = json.dumps({"content": out.logprobs}).encode("utf-8")
                if chat is not None:
                    deltas = chat.parser.feed(out.text) if out.text else []
                    if done is not None:
                        deltas = list(deltas) + list(chat.parser.finish())
                    # Always at least one (maybe empty) delta in a chat chunk: a consumer that
                    # uses chat_deltas when present, else message, must not fall back to the
                    # raw text for chunks whose text the parser is still holding back.
                    reply.chat_deltas.extend(_chat_deltas_pb(deltas) or [pb.ChatDelta()])
                if done is not None:
                    reply.tokens = done.generated_tokens
                    reply.timing_prompt_processing = done.prompt_seconds * 1000.0
                    reply.timing_token_generation = done.generation_seconds * 1000.0
                yield reply

    async def predict(self, request: pb.PredictOptions, ctx: CallContext) -> pb.Reply:
        tokens, chat, outputs = self._submit(request, ctx, "Predict")
        parts: list[str] = []
        logprobs: list[dict[str, Any]] = []
        async with contextlib.aclosing(outputs):
            async for out in outputs:
                parts.append(out.text)
                if out.logprobs:
                    logprobs.extend(out.logprobs)
                if out.completion is not None:
                    done = out.completion
        text = "".join(parts)
        reply = pb.Reply(
            message=text.encode("utf-8"),
            tokens=done.generated_tokens,
            prompt_tokens=len(tokens),
            timing_prompt_processing=done.prompt_seconds * 1000.0,
            timing_token_generation=done.generation_seconds * 1000.0,
        )
        if request.Logprobs > 0 or request.TopLogprobs > 0:
            reply.logprobs = json.dumps({"content": logprobs}).encode("utf-8")
        if chat is not None:
            from inferd.engines.llama.tool_parser import parse_full

            delta = parse_full(text, chat.tools_enabled, chat.thinking, chat.id_salt)
            reply.chat_deltas.extend(_chat_deltas_pb([delta]))
        return reply

    # ---- the other capabilities ------------------------------------------------------------------
    def embedding(self, request: pb.PredictOptions, ctx: CallContext) -> pb.EmbeddingResult:
        engine, _ = self._require("Embedding")
        if request.EmbeddingTokens:
            tokens = list(request.EmbeddingTokens)
            bad = [t for t in tokens if not 0 <= t < engine.n_vocab]
            if bad:
                raise InvalidArgument(f"token ids outside the vocabulary (0..{engine.n_vocab - 1}): {bad[:5]}",
                                      "EmbeddingTokens")
        else:
            text = request.Embeddings or request.Prompt
            if not text:
                raise InvalidArgument("give the text in Embeddings (or Prompt), or EmbeddingTokens", "Embeddings")
            tokens = engine.tokenize(text, add_special=True, parse_special=False)
        try:
            vec = engine.embed(tokens)
        except OverflowError as exc:
            raise InvalidArgument(str(exc), "Embeddings") from None
        except ModelLoadError as exc:
            raise FailedPrecondition(f"cannot create the embedding context: {exc}") from None
        return pb.EmbeddingResult(embeddings=vec)

    def tokenize_string(self, request: pb.PredictOptions, ctx: CallContext) -> pb.TokenizationResponse:
        engine, _ = self._require("TokenizeString")
        tokens = engine.tokenize(request.Prompt, add_special=True, parse_special=True)
        return pb.TokenizationResponse(length=len(tokens), tokens=tokens)

    def get_metrics(self, request: pb.MetricsRequest, ctx: CallContext) -> pb.MetricsResponse:
        scheduler = self.scheduler
        if scheduler is None:
            return pb.MetricsResponse()
        return pb.MetricsResponse(
            slot_id=max(scheduler.last_slot, 0),
            prompt_json_for_slot=json.dumps({
                "active": scheduler.active_count(), "waiting": scheduler.waiting_count(),
                "slots": scheduler.slots,
            }),
            tokens_per_second=scheduler.last_tokens_per_second,
            tokens_generated=scheduler.total_generated,
            prompt_tokens_processed=scheduler.total_prompt,
        )

    def model_metadata(self, request: pb.ModelOptions, ctx: CallContext) -> pb.ModelMetadataResponse:
        engine, _ = self._require("ModelMetadata")
        template = self.template
        try:
            rendered = template.render(
                [{"role": "user", "content": "Hello"}], add_generation_prompt=True, enable_thinking=True,
                bos_token=engine.bos_text, eos_token=engine.eos_text,
            )
        except ValueError as exc:
            log.warning("ModelMetadata: template render failed: %s", exc)
            rendered = ""
        return pb.ModelMetadataResponse(supports_thinking=bool(template.supports_thinking),
                                        rendered_template=rendered)


__all__ = ["LlamaCppBackend", "plan_load", "resolve_model_path", "sampling_params"]

