"""Servers shared by the non-destructive reliability tests (soak, cancellation).

Starting llama-cpp and sentence-embeddings costs seconds each, so one set of processes serves
every module that leaves them as it found them (READY, model loaded). Destructive tests
(fuzzing LoadModel/Free, the lifecycle stress, faults) start their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.reliability.servers import BackendUnavailable, ServerProc, serving


@pytest.fixture(scope="session")
def trio() -> Iterator[dict[str, ServerProc]]:
    """llama-cpp (packaged SmolLM2, Threads 1, 4 slots), sentence-embeddings and local-store, loaded."""
    with contextlib.ExitStack() as stack:
        try:
            servers = {name: stack.enter_context(serving(name))
                       for name in ("llama-cpp", "sentence-embeddings", "local-store")}
        except BackendUnavailable as exc:
            pytest.skip(str(exc))
        yield servers
