"""OpenAI's error shape and the one map from failures to HTTP statuses.

Every failure of the HTTP front leaves as ``{"error": {"message", "type", "param",
"code"}}`` (what the official clients parse into ``openai.APIStatusError``). Backend
failures arrive as ``RpcError`` with a gRPC status; ``STATUS_TO_HTTP`` turns that code
into the HTTP status, so the gRPC and HTTP fronts agree on what each failure means.
"""

from __future__ import annotations

from typing import Any

import grpc

from inferd.client import RpcError

# gRPC status -> (HTTP status, OpenAI error type)
STATUS_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
    grpc.StatusCode.FAILED_PRECONDITION: (503, "service_unavailable"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class APIError(Exception):
    """A failure to report to the HTTP caller in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, "invalid_request_error", param)


def from_rpc_error(exc: RpcError) -> APIError:
    """The HTTP form of a backend failure; the gRPC code name travels as ``code``."""
    status, type_ = STATUS_TO_HTTP.get(exc.code, (500, "server_error"))
    param = None
    if exc.code == grpc.StatusCode.INVALID_ARGUMENT and ":" in exc.details:
        head = exc.details.split(":", 1)[0].strip()
        param = head if head and " " not in head else None  # "Field: message" from InvalidArgument
    return APIError(status, exc.details or exc.code.name, type_, param, exc.code.name.lower())
