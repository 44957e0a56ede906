"""The OpenAI-compatible ASGI app: routes, OpenAI-shaped errors, auth, ``/metrics``.

``create_app(source, api_keys=..., metrics=...)`` builds a FastAPI app over a
``ModelSource`` (the supervisor's models, or fixed addresses). Everything is async:
a route awaits the backend's async client and never blocks the loop, so one process
serves many concurrent streams. ``/metrics`` and ``/healthz`` need no key (scrapers
and probes); every ``/v1`` route does when keys are set.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferd.http import console
from inferd.http.deps import check_auth
from inferd.http.errors import APIError
from inferd.http.routes import audio, chat, completions, embeddings, models, rerank
from inferd.http.source import ModelSource
from inferd.observability.metrics import CONTENT_TYPE_LATEST, Metrics

MAX_BODY_BYTES = 128 * 1024 * 1024  # an audio upload (100 MiB) plus form overhead; JSON bodies are far smaller


def create_app(source: ModelSource, api_keys: Iterable[str] = (), metrics: Metrics | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="inferd", description="OpenAI-compatible API over inferd backends",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.source = source
    app.state.api_keys = tuple(k.encode() for k in api_keys if k)
    app.state.metrics = metrics
    auth = [Depends(check_auth)]
    for module in (models, chat, completions, embeddings, rerank, audio):
        app.include_router(module.router, dependencies=auth)
    app.include_router(console.page_router)  # the web console (GET /): its page needs no key, its API does
    app.include_router(console.api_router, dependencies=auth)
    _install_error_handlers(app)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    if metrics is not None:
        _install_metrics(app, metrics)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request body")
        if first.get("type") == "json_invalid":
            message, param = "the body is not valid JSON", None
        err = APIError(400, f"{param}: {message}" if param else message, "invalid_request_error", param)
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, str(exc.detail), type_)
        return JSONResponse(err.body(), status_code=exc.status_code)


def _install_metrics(app: FastAPI, metrics: Metrics) -> None:
    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_MetricsMiddleware, metrics=metrics)


class _MetricsMiddleware:
    """Counts and times each HTTP request until its last body byte (streams included)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in ("/metrics", "/healthz"):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        m = self.metrics

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        path = scope["path"]
        m.in_flight.labels("http", path).inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            method = getattr(route, "path", None) or ("unmatched" if status["code"] == 404 else path)
            m.in_flight.labels("http", path).dec()
            m.requests.labels("http", method, str(status["code"])).inc()
            m.latency.labels("http", method).observe(time.perf_counter() - start)


class _BodyLimit:
    """Refuses bodies larger than ``limit`` with 413 before they are buffered (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        err = APIError(413, f"the request body is larger than {self.limit} bytes", "invalid_request_error",
                       None, "request_too_large")
        await JSONResponse(err.body(), status_code=413)({"type": "http"}, _no_receive, send)


class _TooLarge(BaseException):  # noqa: N818 - BaseException: FastAPI turns an Exception from the body into a 400
    """Raised from ``receive`` past the limit; caught by ``_BodyLimit`` only."""


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}
