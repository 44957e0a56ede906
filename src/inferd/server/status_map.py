"""THE map from Python exceptions to gRPC status codes (the only one in the code base).

The servicer uses it to abort calls; the embedded client uses it to raise the same
``RpcError`` a networked call would. Anything not listed is a bug: INTERNAL, with the
traceback logged server-side and only the exception type and message sent.
"""

from __future__ import annotations

import logging

import grpc

from inferd import errors

log = logging.getLogger("inferd.errors")

# Most specific first; the first ``isinstance`` match wins.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NoModelLoaded, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.LoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unsupported, grpc.StatusCode.UNIMPLEMENTED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def to_status(exc: BaseException, rpc: str = "") -> tuple[grpc.StatusCode, str]:
    """Return the status code and the message a person can act on for ``exc``."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            message = getattr(exc, "message", None) or str(exc) or cls.__name__
            return code, message
    log.error("unexpected error in %s", rpc or "rpc", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {rpc or 'rpc'}: {type(exc).__name__}: {exc}"
