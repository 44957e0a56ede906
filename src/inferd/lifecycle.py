"""The lifecycle gate: model calls (readers) against LoadModel/Free (the one writer).

Why: a ``parallel = True`` backend takes no lock, so before this gate a ``Free`` could
close llama.cpp's context while an ``Embedding`` still ran in it (SIGABRT, "pure virtual
method called"). The rule now, for every backend:

* a model call takes a ``Lease`` before it starts and gives it back when its work has
  really stopped (a worker thread that outlives its caller keeps the lease, see
  ``Lease.defer_until``);
* LoadModel/Free take the writer slot: from then on new model calls are refused at
  once with ``Unavailable`` ("model is being loaded" / "model is being unloaded") —
  refused, not queued, so nothing piles up behind a slow load and clients retry on
  UNAVAILABLE as gRPC clients do;
* the writer withdraws the calls in flight: streams at once (``ctx.cancel(reason)``:
  they end with UNAVAILABLE "model is being unloaded"), unary calls after a short grace
  (``UNARY_GRACE_S``), then waits, bounded by the drain timeout, until no lease is left.
  If calls are still running at the bound, the writer gives up with ``Unavailable`` and
  leaves the model as it is: native memory is never freed under a running call;
* only then does the writer unload/load, and it releases the slot when that work ends.

Health, Status, GetMetrics and the job-progress rpcs never take a lease (the runtime's
``UNGATED``): they answer while the gate is closed.

The gate is thread- and loop-agnostic (a ``threading.Lock`` and polling): it lives on the
backend, so every runtime over one backend (the server and an embedded client) shares it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from inferd.errors import Unavailable

if TYPE_CHECKING:  # the backends package imports this module (Backend owns its gate)
    from inferd.backends.context import CallContext

log = logging.getLogger("inferd.lifecycle")

LOADING = "model is being loaded"
UNLOADING = "model is being unloaded"
#: Unary calls in flight get this long to finish before a writer cancels them too.
UNARY_GRACE_S = 5.0
_POLL_S = 0.01


class Lease:
    """One model call's hold on the gate; released exactly once, perhaps later by its worker."""

    __slots__ = ("_gate", "ctx", "streaming", "deferred", "_released", "_finalizers")

    def __init__(self, gate: LifecycleGate, ctx: CallContext, streaming: bool) -> None:
        self._gate = gate
        self.ctx = ctx
        self.streaming = streaming
        self.deferred = False
        self._released = False
        self._finalizers: list[Callable[[], None]] = []

    def on_release(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the lease is released (the call lock, the busy counter)."""
        self._finalizers.append(fn)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            for fn in reversed(self._finalizers):
                fn()
        finally:
            self._gate._leave(self)

    def defer_until(self, fut: asyncio.Future) -> None:
        """Keep holding until ``fut`` (a worker that has not stopped yet) completes.

        The caller may return (its client went away); the model stays protected from
        Free/LoadModel until the worker really ends.
        """
        self.deferred = True
        fut.add_done_callback(lambda f: (consume_result(f), self.release()))


class Writer:
    """The writer slot held by one LoadModel/Free."""

    __slots__ = ("_gate", "deferred", "_released")

    def __init__(self, gate: LifecycleGate) -> None:
        self._gate = gate
        self.deferred = False
        self._released = False

    def release(self, force: bool = False) -> None:
        if self._released or (self.deferred and not force):
            return
        self._released = True
        self._gate._end_write()


class LifecycleGate:
    """Readers/writer gate; see the module docstring."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._readers: set[Lease] = set()
        self._writer: str | None = None  # the refusal message while a writer holds the gate

    @property
    def writing(self) -> bool:
        return self._writer is not None

    def in_flight(self) -> int:
        return len(self._readers)

    # ---- readers --------------------------------------------------------------------
    def enter(self, ctx: CallContext, streaming: bool) -> Lease:
        """A lease for one model call, or ``Unavailable`` while LoadModel/Free run."""
        with self._mutex:
            if self._writer is not None:
                raise Unavailable(f"{ctx.rpc}: {self._writer}; retry when LoadModel/Free has finished")
            lease = Lease(self, ctx, streaming)
            self._readers.add(lease)
        return lease

    def _leave(self, lease: Lease) -> None:
        with self._mutex:
            self._readers.discard(lease)

    # ---- the writer -----------------------------------------------------------------
    async def acquire_writer(self, refusal: str, wait_s: float) -> Writer:
        """The writer slot; waits at most ``wait_s`` for another LoadModel/Free to end."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._mutex:
                if self._writer is None:
                    self._writer = refusal
                    return Writer(self)
                current = self._writer
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"another LoadModel/Free is still running ({current}) after waiting {wait_s:g}s; retry later")
            await asyncio.sleep(5 * _POLL_S)

    def _end_write(self) -> None:
        with self._mutex:
            self._writer = None

    async def drain(self, reason: str, timeout: float, unary_grace: float = UNARY_GRACE_S) -> None:
        """Withdraw the calls in flight and wait, at most ``timeout`` s, until none is left.

        Streams are cancelled at once; unary calls get ``unary_grace`` s to finish, then
        are cancelled too. Raises ``Unavailable`` (the model untouched) at the bound.
        """
        start = time.monotonic()
        if not self._readers:
            return
        self._withdraw(reason, streams_only=True)
        if not await self._wait_empty(start + min(unary_grace, timeout)):
            n = self._withdraw(reason, streams_only=False)
            log.warning("%d model calls still running %.1fs into %s; cancelling them", n,
                        time.monotonic() - start, reason)
            if not await self._wait_empty(start + timeout):
                with self._mutex:
                    names = sorted({lease.ctx.rpc for lease in self._readers})
                    n = len(self._readers)
                log.error("%d model calls (%s) did not stop within %.1fs; the model is left as it is",
                          n, ", ".join(names), timeout)
                raise Unavailable(
                    f"{n} model calls ({', '.join(names)}) did not stop within {timeout:g}s; "
                    f"the model was left as it is; retry later")
        log.info("drained the calls in flight in %.3fs (%s)", time.monotonic() - start, reason)

    def _withdraw(self, reason: str, streams_only: bool) -> int:
        with self._mutex:
            leases = [lease for lease in self._readers if lease.streaming or not streams_only]
        for lease in leases:
            lease.ctx.cancel(reason)
        return len(leases)

    async def _wait_empty(self, deadline: float) -> bool:
        while self._readers:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True


def consume_result(fut: asyncio.Future) -> None:
    """Retrieve a finished future's exception so asyncio does not log it as never retrieved."""
    if not fut.cancelled():
        fut.exception()
