"""``POST /v1/completions``: a prompt in, a text completion or an SSE stream out (legacy API)."""

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
from inferd.http.schemas import CompletionRequest
from inferd.http.sse import DONE, event, sse_response

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    scope = call_scope(request, body.model)
    options = tr.completion_options(body, scope.correlation_id)
    rid = f"cmpl-{scope.correlation_id}"
    created = int(time.time())
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        first, replies = await scope.open_stream("PredictStream", options)
        return sse_response(_chunks(scope, rid, created, body.model, options.Tokens, first, replies, include_usage),
                            scope.correlation_id)
    reply = await scope.unary("Predict", options)
    text = reply.message.decode("utf-8", "replace")
    if text:
        scope.saw_text()
    scope.finished(reply)
    choice = {"index": 0, "text": text, "logprobs": tr.legacy_logprobs(tr.reply_logprobs(reply)),
              "finish_reason": tr.finish_reason(reply.tokens, options.Tokens, False)}
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                         "choices": [choice], "usage": tr.usage(reply.prompt_tokens, reply.tokens)},
                        headers={"X-Request-Id": scope.correlation_id})


async def _chunks(scope: CallScope, rid: str, created: int, model: str, max_tokens: int, first: Any,
                  replies: AsyncIterator[Any], include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> bytes:
        return event({"id": rid, "object": "text_completion", "created": created, "model": model,
                      "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    last = None
    code = "OK"
    offset = 0
    try:
        reply = first
        while reply is not None:
            last = reply
            text = reply.message.decode("utf-8", "replace")
            logprobs = tr.legacy_logprobs(tr.reply_logprobs(reply), offset)
            offset += len(text)
            if text or logprobs:
                scope.saw_text()
                yield chunk(text, logprobs=logprobs)
            try:
                reply = await replies.__anext__()
            except StopAsyncIteration:
                reply = None
        tokens = last.tokens if last is not None else 0
        yield chunk("", tr.finish_reason(tokens, max_tokens, False))
        if include_usage:
            prompt = last.prompt_tokens if last is not None else 0
            yield event({"id": rid, "object": "text_completion", "created": created, "model": model,
                         "choices": [], "usage": tr.usage(prompt, tokens)})
        yield DONE
    except RpcError as exc:
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
