"""Per-request plumbing shared by the routes: auth, the call scope, the correlation id."""

from __future__ import annotations

import hmac
import uuid

from fastapi import Request

from inferd.http.calls import CallScope
from inferd.http.errors import APIError


def correlation_id(request: Request) -> str:
    """The caller's ``X-Request-Id`` (bounded, printable) or a fresh one."""
    given = request.headers.get("x-request-id", "")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return uuid.uuid4().hex


def call_scope(request: Request, model: str) -> CallScope:
    state = request.app.state
    route = request.scope.get("route")
    return CallScope(state.source, model, correlation_id(request), state.metrics,
                     getattr(route, "path", request.url.path))


def check_auth(request: Request) -> None:
    """``Authorization: Bearer KEY`` (or ``x-api-key``) when keys are configured; 401 otherwise."""
    keys: tuple[bytes, ...] = request.app.state.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    credential = token if scheme.lower() == "bearer" and token else request.headers.get("x-api-key", "")
    if not credential:
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                       None, "missing_api_key")
    ok = False
    for key in keys:  # compare with every key: timing does not reveal which matched
        ok |= hmac.compare_digest(credential.encode(), key)
    if not ok:
        raise APIError(401, "Incorrect API key provided", "authentication_error", None, "invalid_api_key")
