"""Servers shared by the non-destructive reliability tests (soak, cancellation).

Starting llama-cpp and sentence-embeddings costs seconds each, so one set of processes serves
every module that leaves them as it found them (READY, model loaded): ``trio``. ``fleet`` is
every registered backend behind an API key, started at once, shared by the fuzzer (which
reloads the model after fuzzing LoadModel/Free) and the credential matrix (whose refused calls
never reach a backend). The lifecycle stress and the faults start their own. Both are
package-scoped: the processes end with tests/reliability, not with the whole test session.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.reliability.fuzz_session import fuzz_args
from tests.reliability.servers import BackendUnavailable, ServerProc, registered_backends, serving, spawn_all

#: Worker threads of the trio's runtimes: a small bound, so a pool that grows on demand stays
#: distinguishable from a leak (tests/reliability/test_soak.py).
TRIO_WORKERS = 4
#: The API key of the fleet: every call of the suite sends it, the security matrix checks the rest.
FLEET_KEY = "reliability-key"


@pytest.fixture(scope="package")
def trio() -> Iterator[dict[str, ServerProc]]:
    """llama-cpp (packaged SmolLM2, Threads 1, 4 slots), sentence-embeddings and local-store, loaded."""
    with contextlib.ExitStack() as stack:
        try:
            servers = {name: stack.enter_context(serving(name, "--max-workers", str(TRIO_WORKERS)))
                       for name in ("llama-cpp", "sentence-embeddings", "local-store")}
        except BackendUnavailable as exc:
            pytest.skip(str(exc))
        yield servers


@pytest.fixture(scope="package")
def fleet() -> Iterator[dict[str, ServerProc | Exception]]:
    """Every registered backend (fuzzing flags and limits, API key ``FLEET_KEY``), loaded."""
    args, limits = fuzz_args()
    servers = spawn_all(registered_backends(), *args, load=True, limits=limits, api_key=FLEET_KEY)
    yield servers
    for server in servers.values():
        if isinstance(server, ServerProc):
            server.close()


def fleet_member(fleet: dict[str, ServerProc | Exception], backend: str) -> ServerProc:
    """The backend's server; skips when its engine is not installed, raises its start failure."""
    server = fleet[backend]
    if isinstance(server, BackendUnavailable):
        pytest.skip(str(server))
    if isinstance(server, Exception):
        raise server
    return server
