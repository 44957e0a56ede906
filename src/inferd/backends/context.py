"""Per-call context handed to backend methods instead of any gRPC object."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

from inferd.errors import Cancelled


class CallContext:
    """What a backend may know about the call it serves.

    ``cancelled()`` is polled by long-running work (generation loops check it between
    tokens) so a cancelled stream or an expired deadline stops the work promptly. It is
    a ``threading.Event`` because backend methods usually run in worker threads.
    """

    __slots__ = ("rpc", "metadata", "deadline", "_cancel", "revoked")

    def __init__(
        self,
        rpc: str,
        metadata: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> None:
        self.rpc = rpc
        self.metadata: Mapping[str, str] = metadata or {}
        self.deadline = deadline  # time.monotonic() value, or None
        self._cancel = threading.Event()
        #: Why the runtime withdrew this call (e.g. "model is being unloaded"), or None.
        #: Set by the lifecycle gate before it cancels the call; the runtime then answers
        #: UNAVAILABLE with this reason instead of CANCELLED.
        self.revoked: str | None = None

    def cancel(self, reason: str | None = None) -> None:
        """Ask the work to stop; ``reason`` marks a withdrawal by the runtime (see ``revoked``)."""
        if reason is not None and self.revoked is None:
            self.revoked = reason
        self._cancel.set()

    def cancelled(self) -> bool:
        if self._cancel.is_set():
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self._cancel.set()
            return True
        return False

    def check(self) -> None:
        """Raise ``Cancelled`` if the caller went away; call between units of work."""
        if self.cancelled():
            raise Cancelled(f"{self.rpc} cancelled")

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())
