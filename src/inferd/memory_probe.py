"""``Status``'s memory numbers, measured off the event loop and never for long.

``Backend.memory()`` may call NVML (pynvml init/query/shutdown) or torch.cuda, which can
take tens of milliseconds or, with a wedged driver, hang. Run on the event loop it would
stall every stream and Health with it (issue 10, defect 3). The probe runs on its own
single thread (a pool full of model work does not delay it), concurrent ``Status`` calls
share one probe in flight, and an answer is awaited at most ``PROBE_TIMEOUT_S``: past it
``Status`` answers with the process RSS alone (read from /proc, microseconds) and logs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psutil

log = logging.getLogger("inferd.runtime")

#: How long Status waits for the memory probes (NVML, torch.cuda) before answering RSS only.
PROBE_TIMEOUT_S = 2.0

Memory = tuple[int, dict[str, int]]


class MemoryProbe:
    """Runs ``measure`` (a backend's ``memory``) on a dedicated thread, bounded and coalesced."""

    def __init__(self, measure: Callable[[], Memory], timeout: float = PROBE_TIMEOUT_S) -> None:
        self._measure = measure
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferd-probe")
        self._inflight: asyncio.Future | None = None

    async def memory(self) -> Memory:
        probe = self._inflight
        if probe is None or probe.done():
            probe = self._inflight = asyncio.get_running_loop().run_in_executor(self._executor, self._measure)
        try:
            return await asyncio.wait_for(asyncio.shield(probe), self.timeout)
        except TimeoutError:
            log.warning("Status: memory probes (NVML/torch) took over %.1fs; answering RSS only", self.timeout)
            rss = int(psutil.Process().memory_info().rss)
            return rss, {"rss": rss}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
