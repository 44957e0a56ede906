"""``make fuzz``: fuzz every rpc of every registered backend, 10k cases per rpc by default.

Besides the random cases, the full sweep sends every field of every request each of its
type's most hostile values once (NaN/inf, integer extremes, wrong enums, hostile JSON in
JSON-carrying strings, 100k-element repeated fields). Prints, per backend, a table of reply status codes per rpc, then every finding (a reply
that was INTERNAL/UNKNOWN or another non-deliberate status, a reply past its deadline, a
reply that does not parse, or a server that stopped answering Health). Exit status 1 when
there is any finding. The cases are tests/reliability/fuzzing.py, the checks fuzz_runner.py.

    python bench/fuzz.py [--cases 10000] [--seed N] [--backend NAME ...] [--deadline 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.reliability.fuzz_session import fuzz_backend  # noqa: E402
from tests.reliability.servers import BackendUnavailable, registered_backends  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases per rpc (default 10000)")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--backend", action="append", help="backend(s) to fuzz (default: every registered one)")
    parser.add_argument("--deadline", type=float, default=2.0, help="per-call deadline in seconds")
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight")
    parser.add_argument("--sweep", choices=("full", "quick", "off"), default="full",
                        help="also send every field's hostile values once (full: every field of every rpc)")
    parser.add_argument("--quiet", action="store_true", help="no per-rpc progress lines")
    args = parser.parse_args(argv)

    total_findings = 0
    for backend in args.backend or registered_backends():
        started = time.monotonic()
        print(f"== {backend}: {args.cases} cases per rpc, seed {args.seed}", flush=True)
        try:
            report = fuzz_backend(backend, args.cases, args.seed, deadline=args.deadline,
                                  concurrency=args.concurrency, sweep=args.sweep,
                                  progress=None if args.quiet else lambda line: print("  " + line, flush=True))
        except BackendUnavailable as exc:
            print(f"  skipped: {exc}")
            continue
        print(report.table())
        for note in report.notes:
            print("note:", note)
        print(f"{backend}: {sum(sum(c.values()) for c in report.counts.values())} calls in "
              f"{time.monotonic() - started:.0f}s, {len(report.findings)} findings")
        for finding in report.findings[:50]:
            print("  FINDING", finding)
        if report.dead:
            print("  DEAD", report.dead)
        total_findings += len(report.findings) + (1 if report.dead else 0)
        print(flush=True)
    return 1 if total_findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
