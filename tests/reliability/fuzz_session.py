"""One fuzzing session against one backend: spawn it, load its model, fuzz every rpc, report.

Shared by the short seeded run in ``make test`` (tests/reliability/test_fuzz.py) and the full
run of ``make fuzz`` (bench/fuzz.py): same server flags, same order, same checks.
"""

from __future__ import annotations

from collections.abc import Callable

from inferd.proto import backend_pb2 as pb
from inferd.protocol import Rpc
from tests.reliability.fuzz_runner import Report, fuzz_rpcs, ordered_rpcs
from tests.reliability.servers import ServerProc, load_options, spawn

#: The fuzzed server refuses messages past 4 MiB (the generator goes to about twice that), so
#: RESOURCE_EXHAUSTED for oversize requests is exercised without moving 100 MiB per case.
MAX_MESSAGE = 4 << 20
#: Address-space cap of the fuzzed server: an absurd allocation fails inside the process
#: instead of taking the machine's memory from the other tenants.
ADDRESS_SPACE = 8 << 30


def fuzz_args() -> tuple[tuple[str, ...], dict[str, int]]:
    """``inferd serve`` arguments and resource limits of a fuzzed server."""
    return ("--max-message-size", str(MAX_MESSAGE), "--max-workers", "8"), {"RLIMIT_AS": ADDRESS_SPACE}


def fuzz_backend(backend: str, cases: int, seed: int, **kwargs: object) -> Report:
    """Spawn ``backend``, load it and ``fuzz_server`` it; the child is closed afterwards."""
    args, limits = fuzz_args()
    server = spawn(backend, *args, limits=limits)
    try:
        server.loaded = server.load()
        return fuzz_server(server, cases, seed, **kwargs)  # type: ignore[arg-type]
    finally:
        server.close()


def fuzz_server(server: ServerProc, cases: int, seed: int, *, deadline: float = 2.0, concurrency: int = 4,
                batch: int = 200, progress: Callable[[str], None] | None = None, sweep: str = "quick") -> Report:
    """Fuzz every rpc of a spawned server (``cases`` each); the model is reloaded after LoadModel/Free."""
    backend = server.backend
    report = Report()
    loaded = server.loaded or pb.Result(success=False, message="not loaded")
    if not loaded.success:
        # Still fuzz: every rpc must refuse cleanly without a model too.
        report.notes.append(f"LoadModel failed, fuzzed without a model: {loaded.message}")

    def alive() -> bool:
        return server.alive() and server.health(timeout=10)

    def after_rpc(rpc: Rpc) -> None:
        if rpc.name in ("LoadModel", "Free") and loaded.success and alive():
            again = server.load()
            if not again.success:
                raise AssertionError(f"{backend}: the model no longer loads after fuzzing {rpc.name}: "
                                     f"{again.message}")

    fuzz_rpcs(server.channel(), ordered_rpcs(), cases, seed, load=load_options(backend),
              deadline=deadline, concurrency=concurrency, batch=batch, max_bytes=MAX_MESSAGE,
              alive=alive, after_rpc=after_rpc, report=report, progress=progress, sweep=sweep,
              metadata=server.metadata)
    if report.dead is not None:
        report.dead += f"\nexit status {server.proc.poll()}; server stderr:\n{server.stderr_tail()}"
    return report
