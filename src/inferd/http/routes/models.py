"""``GET /v1/models`` and ``GET /v1/models/{model}``: the models this front serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from inferd.http.source import unknown_model

router = APIRouter()


def _card(info: Any) -> dict[str, Any]:
    return {"id": info.name, "object": "model", "created": info.created, "owned_by": f"inferd:{info.backend}"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_card(m) for m in request.app.state.source.models()]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    models = request.app.state.source.models()
    for m in models:
        if m.name == model:
            return _card(m)
    raise unknown_model(model, [m.name for m in models])
