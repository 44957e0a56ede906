"""LocalAI's protobuf messages -> the llama engine's plain types, and engine errors -> proto field names.

``plan_load``: ModelOptions -> ``ModelConfig`` + engine settings, every size bounded
(``inferd.limits``: Threads, ContextSize, NBatch, slots, queue... with the bound in the
message). ``engine_request``: PredictOptions -> (prompt | ``Chat``, ``SamplingParams``); JSON
fields go through ``limits.parse_json`` (size and depth bounds, INVALID_ARGUMENT naming the
field). It runs on the engine's worker threads (JSON of up to 1 MiB is real work).
What each field does is documented in docs/llama-cpp.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from inferd.backends.options import option_bool, split_options
from inferd.engines.llama import Chat, ModelConfig, SamplingParams, default_model_path
from inferd.engines.llama.chat_template import messages_from_proto_fields
from inferd.engines.llama.sampling import MAX_TOP_LOGPROBS
from inferd.errors import InvalidArgument, LoadError
from inferd.limits import MAX_THREADS, bounded_int, parse_json, thread_count
from inferd.paths import confine, resolve_model_location
from inferd.proto import backend_pb2 as pb
from inferd.settings import FALSE_WORDS, TRUE_WORDS

DEFAULT_SLOTS = 4
DEFAULT_MAX_WAITING = 64
DEFAULT_CONTEXT = 4096
MAX_CONTEXT = 1 << 20  # tokens per request
MAX_SLOTS = 256  # llama.cpp's LLAMA_MAX_SEQ
MAX_KV_CELLS = 1 << 22  # ContextSize x slots
MAX_WAITING = 100_000


@dataclass
class LoadPlan:
    """ModelOptions resolved into an engine config plus engine-level settings."""

    config: ModelConfig
    chat_template: str | None = None
    max_waiting: int = DEFAULT_MAX_WAITING
    cache_tokens: int | None = None  # None: the engine's default (half the KV cells)
    ignored: list[str] = field(default_factory=list)


def _option_int(key: str, value: str, minimum: int, maximum: int) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise LoadError(f"Options: {key} expects an integer, got {value!r}") from None
    return bounded_int(n, f"Options {key}", minimum, maximum)


def resolve_model_file(options: pb.ModelOptions, models_dir: str | None) -> str:
    """The GGUF to load: ``inferd.paths.resolve_model_location`` (one rule for every backend),
    else the packaged SmolLM2-135M-Instruct when nothing is named."""
    location = resolve_model_location(options.Model, options.ModelFile, options.ModelPath, models_dir)
    if location.path is not None:
        return str(location.path)
    if location.requested:
        raise LoadError(f"model file not found: {location.reason()}")
    try:
        return default_model_path()
    except Exception as exc:  # noqa: BLE001 - ModelLoadError: the packaged default is missing
        raise LoadError(str(exc)) from None


def plan_load(options: pb.ModelOptions, env: dict[str, str] | None = None,
              models_dir: str | None = None) -> LoadPlan:
    """Map every ModelOptions field llama.cpp honours onto ``ModelConfig`` (bounded)."""
    env = dict(os.environ) if env is None else env
    path = resolve_model_file(options, models_dir)

    def rel(p: str, what: str) -> str:
        if models_dir:
            return str(confine(p, models_dir, what))
        return p if os.path.isabs(p) or not options.ModelPath else os.path.join(options.ModelPath, p)

    lora: list[tuple[str, float]] = []
    if options.LoraAdapter:
        lora.append((rel(options.LoraAdapter, "LoraAdapter"), options.LoraScale or 1.0))
    for i, adapter in enumerate(options.LoraAdapters):
        scale = options.LoraScales[i] if i < len(options.LoraScales) else 1.0
        lora.append((rel(adapter, f"LoraAdapters[{i}]"), scale))

    slots = DEFAULT_SLOTS
    if env.get("LLAMACPP_PARALLEL"):
        slots = _option_int("LLAMACPP_PARALLEL", env["LLAMACPP_PARALLEL"], 1, MAX_SLOTS)
    plan = LoadPlan(config=ModelConfig(path=path))
    extra: dict[str, Any] = {}
    for key, value, raw in split_options(options.Options):
        if key in ("parallel", "slots", "n_parallel", "np"):
            slots = _option_int(key, value, 1, MAX_SLOTS)
        elif key in ("use_jinja", "jinja"):
            option_bool(key, value, empty=True)  # always jinja2; validated so typos surface
        elif key == "chat_template":
            tmpl = value
            if tmpl and "{" not in tmpl and os.path.isfile(rel(tmpl, "Options chat_template")):
                with open(rel(tmpl, "Options chat_template"), encoding="utf-8") as f:
                    tmpl = f.read()
            plan.chat_template = tmpl or None
        elif key in ("queue", "max_queue", "max_waiting"):
            plan.max_waiting = _option_int(key, value, 0, MAX_WAITING)
        elif key in ("cache_tokens", "prompt_cache_tokens", "cache_prompt_tokens"):
            plan.cache_tokens = _option_int(key, value, 0, MAX_KV_CELLS)
        elif key == "cache_prompt":
            if not option_bool(key, value, empty=True):
                plan.cache_tokens = 0
        elif key in ("n_ubatch", "ubatch", "ubatch_size"):
            extra["n_ubatch"] = _option_int(key, value, 1, MAX_CONTEXT)
        elif key in ("threads_batch", "n_threads_batch"):
            extra["threads_batch"] = _option_int(key, value, 1, MAX_THREADS)
        elif key in ("kv_unified", "unified_kv"):
            extra["kv_unified"] = option_bool(key, value, empty=True)
        elif key == "swa_full":
            extra["swa_full"] = option_bool(key, value, empty=True)
        elif key in ("flash_attn", "flash_attention"):
            extra["flash_attn"] = value.strip()
        else:
            plan.ignored.append(raw)

    n_ctx = bounded_int(options.ContextSize, "ContextSize", 0, MAX_CONTEXT) or DEFAULT_CONTEXT
    if n_ctx * slots > MAX_KV_CELLS:
        raise InvalidArgument(f"ContextSize {n_ctx} x {slots} slots = {n_ctx * slots} KV cells; the bound is "
                              f"{MAX_KV_CELLS}", "ContextSize")
    config = plan.config
    config.n_ctx = n_ctx
    config.n_batch = bounded_int(options.NBatch, "NBatch", 0, MAX_CONTEXT) or 2048
    config.slots = slots
    config.threads = thread_count(options.Threads, "Threads", default=0)  # 0: every core
    config.n_gpu_layers = options.NGPULayers
    config.main_gpu = int(options.MainGPU) if options.MainGPU.strip().isdigit() else 0
    config.use_mmap = options.MMap
    config.use_mlock = options.MLock
    config.flash_attn = options.FlashAttention or "auto"
    config.cache_type_k = options.CacheTypeKey
    config.cache_type_v = options.CacheTypeValue
    config.offload_kqv = not options.NoKVOffload
    config.rope_freq_base = options.RopeFreqBase
    config.rope_freq_scale = options.RopeFreqScale
    config.rope_scaling = options.RopeScaling
    config.yarn_ext_factor = options.YarnExtFactor if options.YarnExtFactor else -1.0
    config.yarn_attn_factor = options.YarnAttnFactor if options.YarnAttnFactor else -1.0
    config.yarn_beta_fast = options.YarnBetaFast if options.YarnBetaFast else -1.0
    config.yarn_beta_slow = options.YarnBetaSlow if options.YarnBetaSlow else -1.0
    config.embeddings = options.Embeddings
    config.lora = lora
    config.kv_overrides = list(options.Overrides)
    config.seed = options.Seed if options.Seed else -1
    for key, value in extra.items():
        setattr(config, key, value)
    return plan


# ---- PredictOptions -> engine inputs ---------------------------------------------------------
def _logit_bias(raw: str) -> dict[int | str, float]:
    """OpenAI ``logit_bias``: {"token id" or "text": bias}; ``false`` bans the token (-inf)."""
    if not raw.strip():
        return {}
    data = parse_json(raw, "LogitBias")
    if not isinstance(data, dict):
        raise InvalidArgument("must be a JSON object mapping token ids to biases", "LogitBias")
    out: dict[int | str, float] = {}
    for key, value in data.items():
        if value is False:
            bias = float("-inf")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            bias = float(value)
        else:
            raise InvalidArgument(f"bias for {key!r} must be a number or false, got {value!r}", "LogitBias")
        out[int(key) if key.strip().lstrip("-").isdigit() else key] = bias
    return out


def _tool_choice(raw: str) -> str | dict[str, Any] | None:
    text = raw.strip()
    if not text:
        return None
    if text[0] in "{[\"":
        return parse_json(text, "ToolChoice")
    return text  # LocalAI may send a bare word: auto, none, required


def _enable_thinking(metadata: Any) -> bool | None:
    raw = metadata.get("enable_thinking", "").strip().lower()
    if not raw:
        return None
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise InvalidArgument(f"enable_thinking must be true or false, got {raw!r}", "Metadata")


def is_chat(request: pb.PredictOptions) -> bool:
    return bool(request.Messages) and (request.UseTokenizerTemplate or not request.Prompt)


def engine_request(request: pb.PredictOptions, default_seed: int = -1) -> tuple[str | Chat, SamplingParams]:
    """Validate PredictOptions and build the engine's input; raises InvalidArgument(proto field)."""
    r = request
    checks = (
        (r.Tokens < 0, "Tokens", f"must be >= 0, got {r.Tokens}"),
        (r.Logprobs < 0, "Logprobs", f"must be >= 0, got {r.Logprobs}"),
        (not 0 <= r.TopLogprobs <= MAX_TOP_LOGPROBS, "TopLogprobs",
         f"must be between 0 and {MAX_TOP_LOGPROBS}, got {r.TopLogprobs}"),
    )
    for bad, name, message in checks:
        if bad:
            raise InvalidArgument(message, name)
    for name in ("Images", "Videos", "Audios"):
        if len(getattr(r, name)):
            raise InvalidArgument("this model is text-only (no multimodal projector loaded)", name)
    want_logprobs = r.Logprobs > 0 or r.TopLogprobs > 0
    grammar_text = r.Grammar.strip()
    params = SamplingParams(
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
        seed=r.Seed if r.Seed != 0 else default_seed,
        stop=[s for s in r.StopPrompts if s],
        ignore_eos=r.IgnoreEOS,
        n_keep=r.NKeep,
        logit_bias=_logit_bias(r.LogitBias),
        grammar="" if grammar_text.startswith("{") else r.Grammar,
        json_schema=parse_json(grammar_text, "Grammar") if grammar_text.startswith("{") else None,
        logprobs=min(r.TopLogprobs or r.Logprobs, MAX_TOP_LOGPROBS) if want_logprobs else 0,
        want_logprobs=want_logprobs,
    )
    if params.json_schema is not None and not isinstance(params.json_schema, dict):
        raise InvalidArgument("a JSON schema must be an object", "Grammar")
    if not is_chat(r):
        return r.Prompt, params
    items = [{"role": m.role, "content": m.content, "name": m.name, "tool_call_id": m.tool_call_id,
              "reasoning_content": m.reasoning_content, "tool_calls": m.tool_calls} for m in r.Messages]
    try:
        messages = messages_from_proto_fields(items)
    except ValueError as exc:
        raise InvalidArgument(str(exc), "Messages") from None
    tools = parse_json(r.Tools, "Tools") if r.Tools.strip() else None
    if tools is not None and not isinstance(tools, list):
        raise InvalidArgument("must be a JSON array of tools", "Tools")
    chat = Chat(messages=messages, tools=tools, tool_choice=_tool_choice(r.ToolChoice),
                enable_thinking=_enable_thinking(r.Metadata), id_salt=r.CorrelationId)
    return chat, params


# engine field names (snake_case, OpenAI's) -> PredictOptions field names
_PROTO_FIELDS = {
    "prompt": "Prompt", "messages": "Messages", "tools": "Tools", "tool_choice": "ToolChoice",
    "grammar": "Grammar", "json_schema": "Grammar", "logit_bias": "LogitBias", "max_tokens": "Tokens",
    "temperature": "Temperature", "top_k": "TopK", "top_p": "TopP", "min_p": "MinP", "typical_p": "TypicalP",
    "repeat_penalty": "Penalty", "repeat_last_n": "Repeat", "frequency_penalty": "FrequencyPenalty",
    "presence_penalty": "PresencePenalty", "mirostat": "Mirostat", "mirostat_tau": "MirostatTAU",
    "mirostat_eta": "MirostatETA", "n_keep": "NKeep", "logprobs": "TopLogprobs", "input": "Embeddings",
    "tokens": "EmbeddingTokens",
}


def proto_field_error(exc: InvalidArgument) -> InvalidArgument:
    """The same error with the engine's field name replaced by the PredictOptions field name."""
    name = exc.field or ""
    head, sep, tail = name.partition("[")
    mapped = _PROTO_FIELDS.get(head)
    if mapped is None:
        return exc
    message = exc.message[len(name) + 2:] if exc.message.startswith(name + ": ") else exc.message
    return InvalidArgument(message, mapped + sep + tail)
