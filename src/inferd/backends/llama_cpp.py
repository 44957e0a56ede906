"""The ``llama-cpp`` backend: LocalAI's Backend protocol over ``AsyncLlamaEngine``.

Translation only: ModelOptions -> load plan and PredictOptions -> engine inputs
(``llama_cpp_options``), engine outputs -> ``Reply``, engine field names -> proto field names
in errors. The chat pipeline, preparation off the event loop, batching and the prefix cache
are the engine's (``inferd.engines.llama.engine``), shared with every other front.
``predict``/``predict_stream`` are ``async``: they await the engine, so open streams hold no
worker threads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from inferd.backends.base import Backend
from inferd.backends.context import CallContext
from inferd.backends.llama_cpp_options import engine_request, plan_load, proto_field_error
from inferd.backends.model_ops import ModelOpsMixin
from inferd.engines.llama import AsyncLlamaEngine, Chat
from inferd.engines.llama.tool_parser import ChatDelta
from inferd.errors import InvalidArgument, NoModelLoaded
from inferd.proto import backend_pb2 as pb

log = logging.getLogger("inferd.backends.llama_cpp")


def _chat_deltas_pb(deltas: list[ChatDelta]) -> list[pb.ChatDelta]:
    return [
        pb.ChatDelta(content=d.content, reasoning_content=d.reasoning_content,
                     tool_calls=[pb.ToolCallDelta(index=t.index, id=t.id, name=t.name, arguments=t.arguments)
                                 for t in d.tool_calls])
        for d in deltas if d.content or d.reasoning_content or d.tool_calls
    ]


class LlamaCppBackend(ModelOpsMixin, Backend):
    """Text generation, chat, embeddings and tokenization on llama.cpp (GGUF models)."""

    name = "llama-cpp"
    parallel = True  # the engine serializes access to the model; calls only enqueue
    has_text_engine = True

    def __init__(self, settings: Any = None) -> None:
        super().__init__()
        self.settings = settings
        self.engine: AsyncLlamaEngine | None = None
        self.default_seed = -1
        self.model_path = ""

    # ---- lifecycle ------------------------------------------------------------------------
    def load(self, options: pb.ModelOptions, ctx: CallContext) -> str:
        plan = plan_load(options, models_dir=getattr(self.settings, "models_dir", None) or None)
        engine = AsyncLlamaEngine.load(plan.config, chat_template=plan.chat_template,
                                       max_waiting=plan.max_waiting, cache_tokens=plan.cache_tokens)
        self.engine = engine
        self.default_seed = plan.config.seed
        self.model_path = plan.config.path
        if plan.ignored:
            log.info("llama-cpp: ignored options %s", plan.ignored)
        model, sched = engine.model, engine.scheduler
        return (
            f"loaded {os.path.basename(plan.config.path)} ({model.description()}): n_ctx {model.n_ctx}, "
            f"slots {model.n_seq_max}, threads {model.threads}, kv_unified {plan.config.kv_unified}, "
            f"prefix cache {sched.cache.max_tokens} tokens, chat template from {engine.template.source}"
        )

    def text_engine(self) -> AsyncLlamaEngine | None:
        return self.engine

    def unload(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()

    def memory(self) -> tuple[int, dict[str, int]]:
        total, breakdown = super().memory()
        engine = self.engine
        if engine is not None and engine.model.model is not None:
            breakdown["llama_model_bytes"] = engine.model.size_bytes()
        return total, breakdown

    def _require(self, rpc: str) -> AsyncLlamaEngine:
        engine = self.engine
        if engine is None:
            raise NoModelLoaded(self.name, rpc)
        return engine

    async def _start(self, request: pb.PredictOptions, ctx: CallContext, rpc: str) -> tuple[AsyncLlamaEngine, Any]:
        engine = self._require(rpc)
        try:
            prompt, params = await engine.run_blocking(engine_request, request, self.default_seed)
        except InvalidArgument as exc:
            raise proto_field_error(exc) from None
        return engine, (prompt, params)

    # ---- Predict / PredictStream --------------------------------------------------------------
    async def predict_stream(self, request: pb.PredictOptions, ctx: CallContext) -> AsyncIterator[pb.Reply]:
        engine, (prompt, params) = await self._start(request, ctx, "PredictStream")
        is_chat = isinstance(prompt, Chat)
        stream = engine.generate(prompt, params, is_cancelled=ctx.cancelled)
        try:
            async for out in stream:
                reply = pb.Reply(message=out.text.encode("utf-8"), tokens=out.generated_tokens,
                                 prompt_tokens=out.prompt_tokens)
                if out.logprobs:
                    reply.logprobs = json.dumps({"content": out.logprobs}).encode("utf-8")
                if is_chat:
                    # Always at least one (maybe empty) delta in a chat chunk: a consumer that
                    # uses chat_deltas when present, else message, must not fall back to the raw
                    # text for chunks whose text the parser is still holding back.
                    reply.chat_deltas.extend(_chat_deltas_pb(out.chat_deltas) or [pb.ChatDelta()])
                if out.finish_reason is not None:
                    reply.timing_prompt_processing = out.prompt_seconds * 1000.0
                    reply.timing_token_generation = out.generation_seconds * 1000.0
                yield reply
        except InvalidArgument as exc:
            raise proto_field_error(exc) from None
        finally:
            await stream.aclose()

    async def predict(self, request: pb.PredictOptions, ctx: CallContext) -> pb.Reply:
        engine, (prompt, params) = await self._start(request, ctx, "Predict")
        try:
            result = await engine.complete(prompt, params, is_cancelled=ctx.cancelled)
        except InvalidArgument as exc:
            raise proto_field_error(exc) from None
        reply = pb.Reply(
            message=result.text.encode("utf-8"), tokens=result.generated_tokens, prompt_tokens=result.prompt_tokens,
            timing_prompt_processing=result.prompt_seconds * 1000.0,
            timing_token_generation=result.generation_seconds * 1000.0,
        )
        if result.logprobs is not None:
            reply.logprobs = json.dumps({"content": result.logprobs}).encode("utf-8")
        if result.chat is not None:
            reply.chat_deltas.extend(_chat_deltas_pb([result.chat]))
        return reply

    # ---- the other capabilities (blocking: the runtime runs them on worker threads) ----------------
    def embedding(self, request: pb.PredictOptions, ctx: CallContext) -> pb.EmbeddingResult:
        engine = self._require("Embedding")
        text = request.Embeddings or request.Prompt
        if not request.EmbeddingTokens and not text:
            raise InvalidArgument("give the text in Embeddings (or Prompt), or EmbeddingTokens", "Embeddings")
        try:
            vec = engine.embed(list(request.EmbeddingTokens) if request.EmbeddingTokens else text)
        except InvalidArgument as exc:
            raise proto_field_error(exc) from None
        return pb.EmbeddingResult(embeddings=vec)

    def tokenize_string(self, request: pb.PredictOptions, ctx: CallContext) -> pb.TokenizationResponse:
        tokens = self._require("TokenizeString").tokenize(request.Prompt)
        return pb.TokenizationResponse(length=len(tokens), tokens=tokens)

    def get_metrics(self, request: pb.MetricsRequest, ctx: CallContext) -> pb.MetricsResponse:
        engine = self.engine
        if engine is None:
            return pb.MetricsResponse()
        stats = engine.stats()
        return pb.MetricsResponse(
            slot_id=max(stats["last_slot"], 0),
            prompt_json_for_slot=json.dumps(stats),
            tokens_per_second=stats["tokens_per_second"],
            tokens_generated=stats["tokens_generated"],
            prompt_tokens_processed=stats["prompt_tokens_processed"],
        )

    def model_metadata(self, request: pb.ModelOptions, ctx: CallContext) -> pb.ModelMetadataResponse:
        engine = self._require("ModelMetadata")
        try:
            rendered = engine.render_chat(Chat([{"role": "user", "content": "Hello"}], enable_thinking=True))
        except InvalidArgument as exc:
            log.warning("ModelMetadata: template render failed: %s", exc)
            rendered = ""
        return pb.ModelMetadataResponse(supports_thinking=bool(engine.template.supports_thinking),
                                        rendered_template=rendered)


__all__ = ["LlamaCppBackend", "plan_load"]
