"""``POST /v1/rerank`` (and ``/rerank``): Jina's request/response shape, as LocalAI serves it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from inferd.http.deps import call_scope
from inferd.http.schemas import RerankRequest
from inferd.proto import backend_pb2 as pb

router = APIRouter()


@router.post("/v1/rerank")
@router.post("/rerank")
async def rerank(body: RerankRequest, request: Request) -> Any:
    scope = call_scope(request, body.model)
    reply = await scope.unary("Rerank", pb.RerankRequest(query=body.query, documents=body.documents,
                                                         top_n=body.top_n or 0))
    results = []
    for r in reply.results:
        item: dict[str, Any] = {"index": r.index, "relevance_score": r.relevance_score}
        if body.return_documents:
            item["document"] = {"text": r.text}
        results.append(item)
    scope.finished(None)
    return JSONResponse({"model": body.model, "results": results,
                         "usage": {"prompt_tokens": reply.usage.prompt_tokens,
                                   "total_tokens": reply.usage.total_tokens}},
                        headers={"X-Request-Id": scope.correlation_id})
