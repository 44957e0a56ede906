"""The BLAS thread count around a scan (``threadpoolctl``; a no-op without it).

Why: an exact float32 scan is a memory-bound matrix-vector product. On the 2-core machine
shared with other work, OpenBLAS's threads made it 2-30x slower than one thread (10k x 384:
7-8 ms vs 0.25 ms; 100k: 9-16 ms vs 5-7 ms), because each call waits for a descheduled
helper thread. Restoring the count after each scan keeps other numpy users in the process
unaffected. One process-wide controller: threadpoolctl's library lookup is slow, so it is
done once, on first use.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


class _Blas:
    def __init__(self) -> None:
        self._lib: Any = None
        self._tried = False
        self._lock = threading.Lock()

    def _controller(self) -> Any:
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    from threadpoolctl import ThreadpoolController

                    libs = ThreadpoolController().select(user_api="blas").lib_controllers
                    self._lib = libs[0] if libs else None
                except Exception:  # noqa: BLE001 - optional speed-up only
                    self._lib = None
        return self._lib

    @contextlib.contextmanager
    def __call__(self, threads: int) -> Iterator[None]:
        lib = self._controller() if threads > 0 else None
        if lib is None:
            yield
            return
        before = lib.get_num_threads()
        lib.set_num_threads(threads)
        try:
            yield
        finally:
            lib.set_num_threads(before)


#: ``with blas_threads(1): ...`` runs the block with one BLAS thread.
blas_threads = _Blas()

__all__ = ["blas_threads"]
