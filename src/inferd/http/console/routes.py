"""Routes of the web console: the page and its static files, and ``/console/api``.

``page_router`` serves ``GET /`` and the three static files with no key (a page cannot
send a header before it has asked for one); ``api_router`` needs the same key as ``/v1``
(``check_auth`` is applied where the app includes it). The API answers from the
supervisor when the front has one (``ManagerSource.manager``: ``ps`` rows, start, stop)
and with the bare model list otherwise (fixed addresses: someone else runs them).
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from inferd.client import Client, RpcError, new_client
from inferd.http.console.jobs import KINDS, JobBoard
from inferd.http.errors import APIError, from_rpc_error
from inferd.http.source import unknown_model

page_router = APIRouter()
api_router = APIRouter(prefix="/console/api")

_STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
           "style.css": "text/css; charset=utf-8"}
_NO_STORE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def _static(name: str) -> Response:
    body = resources.files("inferd.http.console").joinpath("static", name).read_bytes()
    return Response(body, media_type=_STATIC[name], headers=_NO_STORE)


@page_router.get("/", include_in_schema=False)
async def page() -> Response:
    return _static("index.html")


@page_router.get("/console/{name}", include_in_schema=False)
async def static_file(name: str) -> Response:
    if name not in _STATIC:  # a fixed set: no path ever reaches the file system from the URL
        raise APIError(404, f"no console file {name!r}", "not_found_error")
    return _static(name)


# ---- models ------------------------------------------------------------------------------------
def _manager(request: Request) -> Any:
    return getattr(request.app.state.source, "manager", None)


def _known(request: Request, name: str) -> None:
    names = [m.name for m in request.app.state.source.models()]
    if name not in names:
        raise unknown_model(name, names)


@api_router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    manager = _manager(request)
    if manager is None:
        rows = [{"name": m.name, "backend": m.backend, "state": "external", "managed": False}
                for m in request.app.state.source.models()]
        return {"managed": False, "models": rows}
    rows = await manager.ps(status_timeout=1.0)
    for row in rows:
        row["managed"] = True
        row.pop("log", None)  # a server path the page has no use for
    return {"managed": True, "models": rows}


@api_router.post("/models/{name}/start", status_code=202)
async def start_model(name: str, request: Request) -> dict[str, Any]:
    """Start in the background: a load can take minutes; the page sees ``starting`` then the end."""
    manager = _require_manager(request, name)

    async def ensure() -> None:
        with contextlib.suppress(Exception):  # the failure is the slot's last_error, shown by /models
            await manager.ensure(name)

    _spawn(request, ensure())
    return {"name": name, "state": "starting"}


@api_router.post("/models/{name}/stop")
async def stop_model(name: str, request: Request) -> dict[str, Any]:
    manager = _require_manager(request, name)
    stopped = await manager.stop(name, "stopped from the console")
    return {"name": name, "stopped": bool(stopped)}


def _require_manager(request: Request, name: str) -> Any:
    _known(request, name)
    manager = _manager(request)
    if manager is None:
        raise APIError(501, "this front serves fixed addresses: start and stop them where they run",
                       "invalid_request_error", None, "not_managed")
    return manager


# ---- jobs -----------------------------------------------------------------------------------------
class JobRequest(BaseModel):
    """A quantization or fine-tuning job; ``fields`` are the request message's fields."""

    model: str = Field(min_length=1, max_length=256, description="the served model whose backend runs the job")
    kind: str = Field(pattern="^(quantize|finetune)$")
    fields: dict[str, Any] = Field(default_factory=dict)


def board(request: Request) -> JobBoard:
    source = request.app.state.source
    return _app_state(request, "console_jobs", lambda: JobBoard(source.client))  # type: ignore[no-any-return]


@api_router.get("/jobs")
async def jobs(request: Request) -> dict[str, Any]:
    b = board(request)
    manager = _manager(request)
    if manager is not None:  # running jobs of ready backends, wherever they were started
        ready = {n: a for n in manager.names if (a := manager.address(n))}
        clients = _status_clients(request, manager, ready)
        await asyncio.gather(*(b.discover(n, clients[a]) for n, a in ready.items()))
    return {"jobs": b.rows()}


def _status_clients(request: Request, manager: Any, ready: dict[str, str]) -> dict[str, Client]:
    """Clients of our own for the Status polls, one per running backend's address.

    Not ``manager.client()``: that counts as a use of the model (it refreshes the LRU clock),
    and a page left open must not keep every model "recently used".
    """
    cache: dict[str, Client] = _app_state(request, "console_status_clients", dict)
    for address in [a for a in cache if a not in ready.values()]:  # restarted or stopped backends
        _spawn(request, cache.pop(address).close())
    for name, address in ready.items():
        if address not in cache:
            cache[address] = new_client(address, parallel=True, options=manager.channel_options(name))
    return cache


def _app_state(request: Request, name: str, make: Any) -> Any:
    """The console's own objects on ``app.state``, made on first use (the app knows nothing of them)."""
    state = request.app.state
    if getattr(state, name, None) is None:
        setattr(state, name, make())
    return getattr(state, name)


def _spawn(request: Request, coro: Any) -> None:
    tasks: set[asyncio.Task[Any]] = _app_state(request, "console_tasks", set)
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


@api_router.post("/jobs", status_code=201)
async def start_job(body: JobRequest, request: Request) -> dict[str, Any]:
    _known(request, body.model)
    assert body.kind in KINDS
    try:
        job = await board(request).start(body.model, body.kind, body.fields)
    except RpcError as exc:
        raise from_rpc_error(exc) from None
    except (ValueError, TypeError) as exc:  # a field the request message does not have, or of the wrong type
        raise APIError(400, f"fields: {exc}", "invalid_request_error", "fields") from None
    return job.row()


@api_router.post("/jobs/{job_id}/stop")
async def stop_job(job_id: str, request: Request) -> dict[str, Any]:
    b = board(request)
    if job_id not in b.jobs:
        raise APIError(404, f"no job {job_id!r} on the console's board", "not_found_error", "job_id")
    try:
        message = await b.stop(job_id)
    except RpcError as exc:
        raise from_rpc_error(exc) from None
    return {"job_id": job_id, "message": message}
