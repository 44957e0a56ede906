"""Reliability suite (issue 10): fuzzing, load/soak, lifecycle stress, cancellation, faults, security.

Each module proves one family of guarantees listed in docs/reliability.md; the shared
machinery (the descriptor-driven fuzzer, the load generator, server processes) lives in
``fuzzing``, ``loadgen`` and ``servers`` so bench/fuzz.py and bench/soak.py run the same code
at full size.
"""
