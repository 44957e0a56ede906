"""A short load run (bench/soak.py runs 16/64/256 clients for longer and prints the table).

16 clients mix Predict, PredictStream, Embedding and Stores* against three real servers:
zero transport errors, RSS growth under 5 % after warm-up, fds back to their idle baseline once
the clients are gone, threads too (give or take the runtime's bounded worker pool, which grows on
demand: ``make soak`` warms up at its highest level and compares exactly).
"""

from __future__ import annotations

import os

from tests.reliability.conftest import TRIO_WORKERS
from tests.reliability.loadgen import OPS_HEADER, SERVERS_HEADER, run_level

SECONDS = float(os.environ.get("INFERD_SOAK_SECONDS", "9"))


async def test_sixteen_clients_mixing_rpcs_leave_no_trace(trio) -> None:
    await run_level(trio, 16, 3.0, settle=2.0)  # warm-up: lazily created pools and caches are not leaks
    result = await run_level(trio, 16, SECONDS)
    print("\n" + OPS_HEADER + "\n" + "\n".join(result.rows()))
    print(SERVERS_HEADER + "\n" + "\n".join(result.server_rows()))
    assert result.transport_errors == 0, result.errors
    for op, counter in result.codes.items():
        assert counter.get("OK", 0) > 0, f"{op}: no successful call: {dict(counter)}"
    for name, figures in result.servers.items():
        assert figures.rss_growth < 0.05, f"{name}: RSS grew {figures.rss_growth:.1%} after warm-up"
        after = figures.idle_after
        assert after is not None
        # Pools that grow on demand and keep their threads (the runtime's workers, bounded by
        # --max-workers) may add up to their bound; a leak of one thread per call or per
        # connection would pass it many times over in a level of hundreds of calls.
        assert after.threads <= figures.idle_before.threads + TRIO_WORKERS, (
            f"{name}: threads {figures.idle_before.threads} -> {after.threads}, more of "
            f"{figures.idle_before.thread_diff(after)}")
        assert after.fds <= figures.idle_before.fds, f"{name}: fds {figures.idle_before} -> {after}"
    for server in trio.values():
        assert server.alive() and server.health()
