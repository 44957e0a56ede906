"""How a model of ``models.yaml`` scales on Ray: the ``ray:`` block of one entry.

Kept apart from the supervisor's parsing (which only carries the block through) so the
supervisor never imports Ray and a bad ``ray:`` block names its key before Ray starts::

    models:
      - name: smollm
        backend: llama-cpp
        options: {Threads: 1}
        ray:
          num_replicas: 2            # or: autoscaling: {min_replicas: 1, max_replicas: 4,
          num_cpus: 1                #                   target_ongoing_requests: 2}
          memory: 1GiB               # bytes, or a size with KiB/MiB/GiB (Ray reserves it)
          max_ongoing_requests: 16   # per replica; past it Ray queues at the proxy
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inferd.supervisor.config import ConfigError, ModelSpec

_KEYS = {"num_replicas", "autoscaling", "num_cpus", "memory", "max_ongoing_requests",
         "health_check_period_s", "health_check_timeout_s"}
_AUTO_KEYS = {"min_replicas", "max_replicas", "target_ongoing_requests", "initial_replicas"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(b|kib|mib|gib|kb|mb|gb)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3}
#: Bounds that keep a typo from asking Ray for absurd clusters.
MAX_REPLICAS = 1024
MAX_CPUS = 1024.0


@dataclass(frozen=True)
class Autoscaling:
    """Ray Serve autoscaling on ongoing requests per replica."""

    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float
    initial_replicas: int | None = None

    def to_ray(self) -> dict[str, Any]:
        out: dict[str, Any] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                               "target_ongoing_requests": self.target_ongoing_requests}
        if self.initial_replicas is not None:
            out["initial_replicas"] = self.initial_replicas
        return out


@dataclass(frozen=True)
class ScaleSpec:
    """Replicas and per-replica resources of one model's deployment."""

    num_replicas: int = 1
    autoscaling: Autoscaling | None = None
    num_cpus: float = 1.0
    memory: int = 0  # bytes reserved per replica (0: no reservation)
    max_ongoing_requests: int = 16
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 30.0

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options`` (Ray's own names)."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.memory:
            actor["memory"] = self.memory
        opts: dict[str, Any] = {
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.to_ray()
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


def scale_spec(spec: ModelSpec) -> ScaleSpec:
    """Validate ``spec.ray``; every error names the model and the key."""
    raw: Mapping[str, Any] = spec.ray
    where = f"model {spec.name!r}: ray"
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                          f"allowed: {', '.join(sorted(_KEYS))}")
    if "num_replicas" in raw and "autoscaling" in raw:
        raise ConfigError(f"{where}: give num_replicas or autoscaling, not both")
    kw: dict[str, Any] = {}
    if "num_replicas" in raw:
        kw["num_replicas"] = _int(raw["num_replicas"], f"{where}.num_replicas", 1, MAX_REPLICAS)
    if "autoscaling" in raw:
        kw["autoscaling"] = _autoscaling(raw["autoscaling"], f"{where}.autoscaling")
    if "num_cpus" in raw:
        kw["num_cpus"] = _float(raw["num_cpus"], f"{where}.num_cpus", 0.0, MAX_CPUS)
    if "memory" in raw:
        kw["memory"] = parse_size(raw["memory"], f"{where}.memory")
    if "max_ongoing_requests" in raw:
        kw["max_ongoing_requests"] = _int(raw["max_ongoing_requests"], f"{where}.max_ongoing_requests", 1, 100_000)
    for key in ("health_check_period_s", "health_check_timeout_s"):
        if key in raw:
            kw[key] = _float(raw[key], f"{where}.{key}", 0.1, 3600.0)
    return ScaleSpec(**kw)


def _autoscaling(raw: Any, where: str) -> Autoscaling:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping with min_replicas, max_replicas, target_ongoing_requests")
    unknown = set(raw) - _AUTO_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                          f"allowed: {', '.join(sorted(_AUTO_KEYS))}")
    lo = _int(raw.get("min_replicas", 1), f"{where}.min_replicas", 0, MAX_REPLICAS)
    hi = _int(raw.get("max_replicas", max(lo, 1)), f"{where}.max_replicas", 1, MAX_REPLICAS)
    if hi < lo:
        raise ConfigError(f"{where}: max_replicas ({hi}) < min_replicas ({lo})")
    target = _float(raw.get("target_ongoing_requests", 2), f"{where}.target_ongoing_requests", 0.0, 1e6)
    initial = None
    if "initial_replicas" in raw:
        initial = _int(raw["initial_replicas"], f"{where}.initial_replicas", lo, hi)
    return Autoscaling(lo, hi, target, initial)


def parse_size(value: Any, where: str) -> int:
    """Bytes from ``1073741824``, ``"512MiB"``, ``"1GiB"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected bytes or a size like '512MiB', got {value!r}")
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"{where}: expected bytes or a size like '512MiB', got {value!r}")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower() if m.group(2) else None])
    if size > 1 << 50:
        raise ConfigError(f"{where}: {value!r} is larger than 1 PiB")
    return size


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{where}: expected an integer {lo}-{hi}, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{where}: expected an integer {lo}-{hi}, got {value!r}") from None
    if not lo <= number <= hi:
        raise ConfigError(f"{where}: must be {lo}-{hi}, got {number}")
    return number


def _float(value: Any, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not lo <= number <= hi:  # also refuses NaN
        raise ConfigError(f"{where}: must be between {lo:g} and {hi:g}, got {value!r}")
    return number
