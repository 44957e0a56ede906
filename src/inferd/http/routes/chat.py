"""``POST /v1/chat/completions``: messages in, a completion or an SSE stream of chunks out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from inferd.client import RpcError
from inferd.http import translate as tr
from inferd.http.calls import CallScope
from inferd.http.deps import call_scope
from inferd.http.errors import from_rpc_error
from inferd.http.schemas import ChatCompletionRequest
from inferd.http.sse import DONE, event, sse_response

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    scope = call_scope(request, body.model)
    options = tr.chat_options(body, scope.correlation_id)
    rid = f"chatcmpl-{scope.correlation_id}"
    created = int(time.time())
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        first, replies = await scope.open_stream("PredictStream", options)
        return sse_response(_chunks(scope, rid, created, body.model, options.Tokens, first, replies, include_usage),
                            scope.correlation_id)
    reply = await scope.unary("Predict", options)
    content, reasoning, calls = tr.delta_of(reply)
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = tr.merge_tool_calls(calls)
    if content or calls:
        scope.saw_text()
    scope.finished(reply)
    choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": tr.reply_logprobs(reply),
                              "finish_reason": tr.finish_reason(reply.tokens, options.Tokens, bool(calls))}
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                         "choices": [choice], "usage": tr.usage(reply.prompt_tokens, reply.tokens)},
                        headers={"X-Request-Id": scope.correlation_id})


async def _chunks(scope: CallScope, rid: str, created: int, model: str, max_tokens: int, first: Any,
                  replies: AsyncIterator[Any], include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        return event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                      "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    last = None
    saw_calls = False
    code = "OK"
    try:
        yield chunk({"role": "assistant", "content": ""})
        reply = first
        while reply is not None:
            last = reply
            content, reasoning, calls = tr.delta_of(reply)
            delta: dict[str, Any] = {}
            if content:
                delta["content"] = content
            if reasoning:
                delta["reasoning_content"] = reasoning
            if calls:
                delta["tool_calls"] = calls
                saw_calls = True
            logprobs = tr.reply_logprobs(reply)
            if delta or logprobs:
                scope.saw_text()
                yield chunk(delta, logprobs=logprobs)
            try:
                reply = await replies.__anext__()
            except StopAsyncIteration:
                reply = None
        tokens = last.tokens if last is not None else 0
        yield chunk({}, tr.finish_reason(tokens, max_tokens, saw_calls))
        if include_usage:
            prompt = last.prompt_tokens if last is not None else 0
            yield event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [], "usage": tr.usage(prompt, tokens)})
        yield DONE
    except RpcError as exc:  # the backend failed mid-stream: tell the client in OpenAI's shape
        err = from_rpc_error(exc)
        code = str(err.status)
        yield event(err.body())
        yield DONE
    except BaseException:
        code = "disconnected"
        raise
    finally:
        await replies.aclose()
        scope.finished(last, code)
