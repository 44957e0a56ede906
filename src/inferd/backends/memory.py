"""Process memory accounting for ``Status`` and for ``Free`` (seed 002's ClearMemory)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import psutil


def memory_usage() -> tuple[int, dict[str, int]]:
    """Return (total, breakdown) for this process: RSS total plus rss/vms/shared and GPU.

    GPU memory is added when a GPU library is importable (pynvml for NVIDIA, torch.cuda);
    on a CPU-only machine the breakdown simply has no ``gpu_*`` keys.
    """
    info = psutil.Process().memory_info()
    breakdown = {"rss": int(info.rss), "vms": int(info.vms)}
    shared = getattr(info, "shared", None)
    if shared is not None:
        breakdown["shared"] = int(shared)
    breakdown.update(_gpu_memory())
    return int(info.rss), breakdown


def _gpu_memory() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            for i in range(pynvml.nvmlDeviceGetCount()):
                mem = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
                out[f"gpu_{i}_used"] = int(mem.used)
                out[f"gpu_{i}_total"] = int(mem.total)
        finally:
            pynvml.nvmlShutdown()
        return out
    except Exception:  # noqa: BLE001 - no NVIDIA library or driver: no GPU numbers
        pass
    import sys

    torch = sys.modules.get("torch")  # only if a backend already imported it
    if torch is not None:
        try:
            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    out[f"gpu_{i}_allocated"] = int(torch.cuda.memory_allocated(i))
        except Exception:  # noqa: BLE001
            pass
    return out


def release_memory() -> None:
    """Give freed memory back to the OS after a model is dropped.

    Python's ``gc`` frees cycles that still reference model buffers; glibc's
    ``malloc_trim`` returns freed heap pages so RSS actually drops; torch's CUDA
    cache is emptied when torch is in use.
    """
    gc.collect()
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass
