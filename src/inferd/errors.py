"""The error vocabulary shared by engines, backends, the runtime and the clients.

Engines and backends raise these plain Python exceptions; they never import grpc.
The server turns each class into one gRPC status code in exactly one place
(``inferd.server.status_map``), and the embedded client uses the same table, so a
caller sees the same code whether the backend runs in-process or over the network.
"""

from __future__ import annotations


class InferdError(Exception):
    """Base class. Unmapped subclasses surface as INTERNAL."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(InferdError):
    """A request field is malformed or out of range; ``field`` names it."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class FailedPrecondition(InferdError):
    """The call is valid but the backend is not in a state to serve it."""


class NoModelLoaded(FailedPrecondition):
    """A capability needs a model and none is loaded (call LoadModel first)."""

    def __init__(self, backend: str, rpc: str) -> None:
        super().__init__(f"{rpc}: backend '{backend}' has no model loaded; call LoadModel first")


class Unsupported(InferdError):
    """The backend does not implement this capability."""

    def __init__(self, backend: str, rpc: str, detail: str = "") -> None:
        msg = f"backend '{backend}' does not support {rpc}"
        super().__init__(f"{msg}: {detail}" if detail else msg)
        self.backend = backend
        self.rpc = rpc


class ResourceExhausted(InferdError):
    """A bound was hit: queue full, too many requests, input too large."""


class NotFound(InferdError):
    """A referenced object (job, file, key) does not exist."""


class AlreadyExists(InferdError):
    """The object to create exists already (a job id that is still running)."""


class Unauthenticated(InferdError):
    """Missing or wrong credentials."""


class PermissionDenied(InferdError):
    """Credentials are fine but the request is not allowed (e.g. wrong model identity)."""


class Unavailable(InferdError):
    """The backend cannot take the call right now; retrying later may work.

    Raised by the runtime's lifecycle gate while LoadModel/Free run ("model is being
    loaded"/"model is being unloaded"), for streams it cancels to unload the model, and
    when a LoadModel/Free could not start or drain within its bound.
    """


class Cancelled(InferdError):
    """The caller went away or asked to stop; work stopped early."""

    def __init__(self, message: str = "call cancelled") -> None:
        super().__init__(message)


class DeadlineExceeded(InferdError):
    """The call's deadline passed before it finished."""


class LoadError(InferdError):
    """LoadModel could not load the model; reported as ``Result(success=False)``."""
