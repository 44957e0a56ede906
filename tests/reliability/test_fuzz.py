"""Short seeded fuzz of every rpc of every registered backend (``make fuzz`` runs 10k per rpc).

The contract (tests/reliability/fuzz_runner.py): every reply is a deliberate status (never
INTERNAL or UNKNOWN), none arrives past its deadline, every reply parses, and the server
answers Health after each batch. ``INFERD_FUZZ_CASES`` / ``INFERD_FUZZ_SEED`` change the size
and the seed; a finding prints the rpc, the kind of case and the status, and reproduces from
the seed.
"""

from __future__ import annotations

import os

import pytest

from tests.reliability.conftest import fleet_member
from tests.reliability.fuzz_session import fuzz_server
from tests.reliability.servers import registered_backends

CASES = int(os.environ.get("INFERD_FUZZ_CASES", "6"))
SEED = int(os.environ.get("INFERD_FUZZ_SEED", "20261130"))


@pytest.mark.parametrize("backend", registered_backends())
def test_every_rpc_answers_hostile_input_with_a_deliberate_status(backend: str, fleet) -> None:
    report = fuzz_server(fleet_member(fleet, backend), CASES, SEED, deadline=2.0, batch=CASES)
    print(f"\n{backend} (seed {SEED}, {CASES} cases per rpc)\n{report.table()}")
    for note in report.notes:
        print("note:", note)
    assert report.dead is None, report.dead
    assert not report.findings, f"{len(report.findings)} findings, first ones:\n" + "\n".join(
        str(f) for f in report.findings[:15])
