"""``POST /v1/embeddings``: one Embedding call per input, issued together.

The backend's dynamic batcher merges concurrent calls into one forward pass, so a list
input becomes concurrent single-text calls rather than a loop. ``encoding_format:
base64`` packs each vector as little-endian float32, as OpenAI's clients decode it;
``dimensions`` keeps the first N components, renormalized to unit length (as OpenAI does).
Token usage comes from the backend's TokenizeString when it has one.
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from inferd.http.deps import call_scope
from inferd.http.errors import APIError, bad_request
from inferd.http.schemas import MAX_INPUTS, EmbeddingRequest
from inferd.proto import backend_pb2 as pb

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    scope = call_scope(request, body.model)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if len(texts) > MAX_INPUTS:
        raise bad_request(f"at most {MAX_INPUTS} inputs per request, got {len(texts)}", "input")
    for i, t in enumerate(texts):
        if not t:
            raise bad_request("must not be empty", f"input[{i}]" if not isinstance(body.input, str) else "input")
    results = await asyncio.gather(*(scope.unary("Embedding", pb.PredictOptions(Embeddings=t)) for t in texts))
    data = []
    for i, r in enumerate(results):
        vec = list(r.embeddings)
        if body.dimensions is not None:
            if body.dimensions > len(vec):
                raise bad_request(f"the model's vectors have {len(vec)} dimensions, asked {body.dimensions}",
                                  "dimensions")
            vec = vec[: body.dimensions]
            norm = math.sqrt(sum(x * x for x in vec))
            if norm > 0:  # OpenAI's shortened embeddings stay unit-length
                vec = [x / norm for x in vec]
        value: Any = vec
        if body.encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    prompt_tokens = await _token_count(scope, texts)
    scope.finished(None)
    return JSONResponse({"object": "list", "data": data, "model": body.model,
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}},
                        headers={"X-Request-Id": scope.correlation_id})


async def _token_count(scope: Any, texts: list[str]) -> int:
    try:
        replies = await asyncio.gather(*(scope.unary("TokenizeString", pb.PredictOptions(Prompt=t)) for t in texts))
    except APIError as exc:
        if exc.status == 501:  # the backend cannot tokenize: usage stays 0 rather than a guess
            return 0
        raise
    return sum(r.length for r in replies)
