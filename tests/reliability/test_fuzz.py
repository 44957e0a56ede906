"""Short seeded fuzz of every rpc of every registered backend (``make fuzz`` runs 10k per rpc).

The contract (tests/reliability/fuzzing.py): every reply is a deliberate status (never
INTERNAL or UNKNOWN), none arrives past its deadline, every reply parses, and the server
answers Health after each batch. ``INFERD_FUZZ_CASES`` / ``INFERD_FUZZ_SEED`` change the size
and the seed; a finding prints the rpc, the kind of case and the status, and reproduces from
the seed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.reliability.fuzz_session import fuzz_args, fuzz_server
from tests.reliability.servers import ServerProc, registered_backends, spawn_all

CASES = int(os.environ.get("INFERD_FUZZ_CASES", "6"))
SEED = int(os.environ.get("INFERD_FUZZ_SEED", "20261130"))


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[dict[str, ServerProc | Exception]]:
    """Every registered backend, started and loaded at once (fuzzed one after another)."""
    args, limits = fuzz_args()
    servers = spawn_all(registered_backends(), *args, load=True, limits=limits)
    yield servers
    for server in servers.values():
        if isinstance(server, ServerProc):
            server.close()


@pytest.mark.parametrize("backend", registered_backends())
def test_every_rpc_answers_hostile_input_with_a_deliberate_status(backend: str, fuzzed) -> None:
    server = fuzzed[backend]
    if isinstance(server, Exception):
        if type(server).__name__ == "BackendUnavailable":
            pytest.skip(str(server))
        raise server
    report = fuzz_server(server, CASES, SEED, deadline=2.0, batch=CASES)
    print(f"\n{backend} (seed {SEED}, {CASES} cases per rpc)\n{report.table()}")
    for note in report.notes:
        print("note:", note)
    assert report.dead is None, report.dead
    assert not report.findings, f"{len(report.findings)} findings, first ones:\n" + "\n".join(
        str(f) for f in report.findings[:15])
