"""What the supervisor manages: one ``ModelSpec`` per model, one ``SupervisorConfig`` in all.

Read from ``models.yaml`` (``inferd up models.yaml``) or built in Python. Durations
accept seconds (``30``, ``0.5``) or LocalAI-style strings (``500ms``, ``5m``, ``1h``),
so a LocalAI watchdog setting can be copied as is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from inferd.proto import backend_pb2 as pb


class ConfigError(ValueError):
    """The models file is invalid; the message names the entry and the key."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any, what: str) -> float | None:
    """Seconds from ``30``, ``"500ms"``, ``"5m"``; ``None``/0/"off" mean disabled."""
    if value is None or value is False:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if text in ("", "off", "false", "0", "none"):
            return None
        m = _DURATION.match(text)
        if not m:
            raise ConfigError(f"{what}: expected seconds or a duration like '500ms', '5m'; got {value!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0:
        raise ConfigError(f"{what}: must be >= 0, got {value!r}")
    return seconds or None


def parse_percent(value: Any, what: str) -> float:
    """``90``, ``"90%"``, ``0.9`` (a fraction) -> 90.0; 0/off -> 0 (disabled)."""
    text = str(value).strip().lower().rstrip("%")
    if text in ("", "off", "false", "none"):
        return 0.0
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"{what}: expected a percentage like 90 or '90%', got {value!r}") from None
    if 0 < number < 1 and not str(value).strip().endswith("%"):
        number *= 100  # LocalAI writes the threshold as a fraction (0.95)
    if not 0 <= number <= 100:
        raise ConfigError(f"{what}: must be between 0 and 100, got {value!r}")
    return number


@dataclass(frozen=True)
class ModelSpec:
    """One model the supervisor can run: which backend, which model, how to load it.

    ``options`` is a ``ModelOptions`` in protobuf JSON mapping (``{"ContextSize": 2048}``);
    ``model`` fills ``ModelOptions.Model`` (and ``ModelFile`` when it is a file path),
    which is also the model identity LocalAI compares requests against.
    """

    name: str
    backend: str
    model: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = 0  # 0: the child binds a free port itself (no race); N: try N first
    parallel: bool = False  # the client serializes calls unless the backend is parallel
    pinned: bool = False  # never evicted (LRU, memory threshold, groups); only stop/watchdog stop it
    group: str = ""  # mutually exclusive group: starting this model stops the other members
    ray: Mapping[str, Any] = field(default_factory=dict)  # replicas/resources for `inferd ray deploy` (inferd.scale)

    def model_options(self) -> pb.ModelOptions:
        options = pb.ModelOptions()
        try:
            json_format.ParseDict(dict(self.options), options)
        except json_format.ParseError as exc:
            raise ConfigError(f"model {self.name!r}: options is not a valid ModelOptions: {exc}") from None
        if self.model:
            options.Model = self.model
            if not options.ModelFile and os.path.isfile(self.model):
                options.ModelFile = os.path.abspath(self.model)
        return options

    def validate(self) -> None:
        if not self.name or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", self.name):
            raise ConfigError(f"model name {self.name!r}: use letters, digits, '.', '_' or '-'")
        if not self.backend:
            raise ConfigError(f"model {self.name!r}: 'backend' is required")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"model {self.name!r}: port must be 0-65535, got {self.port}")
        self.model_options()


@dataclass(frozen=True)
class SupervisorConfig:
    """Limits and timeouts of the manager and its watchdog (LocalAI's defaults: checks off)."""

    models: tuple[ModelSpec, ...] = ()
    max_loaded: int = 0  # 0: unlimited; else LRU eviction beyond it (LocalAI's LRU limit)
    busy_timeout: float | None = None  # kill a backend busy on one call longer (off by default)
    idle_timeout: float | None = None  # stop a backend idle longer (off by default)
    watchdog_interval: float = 0.5  # LocalAI's DefaultWatchdogInterval
    force_eviction_when_busy: bool = False  # LRU may evict a busy backend (LocalAI: false)
    health_timeout: float = 60.0  # from spawn to Health == OK
    load_timeout: float = 600.0  # LoadModel deadline
    stop_grace: float = 5.0  # SIGTERM -> SIGKILL delay on stop
    child_shutdown_grace: float = 3.0  # INFERD_SHUTDOWN_GRACE given to children
    bind_retries: int = 3  # other ports tried when a child cannot bind its port
    track_external_calls: bool = False  # also poll Status so calls not made through us count
    memory_threshold: float = 0.0  # percent (0: off): past it, evict LRU backends (LocalAI's reclaimer)
    memory_source: str = "system"  # system: used RAM of the machine; process: manager + backends RSS
    memory_interval: float = 1.0  # seconds between memory checks
    http: str = ""  # HOST:PORT of the OpenAI-compatible front (`inferd up --http`); empty: none
    run_dir: str = ""  # control file location; default see ``default_run_dir``
    log_dir: str = ""  # children's logs; default run_dir/logs

    def spec(self, name: str) -> ModelSpec:
        for s in self.models:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.models) or "none"
        raise KeyError(f"unknown model {name!r}; configured: {known}")

    def validate(self) -> None:
        names = [s.name for s in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"duplicate model names: {', '.join(sorted(dup))}")
        for s in self.models:
            s.validate()
        if self.max_loaded < 0:
            raise ConfigError(f"max_loaded: must be >= 0, got {self.max_loaded}")
        if self.watchdog_interval <= 0:
            raise ConfigError("watchdog.interval: must be > 0")
        if not 0 <= self.memory_threshold <= 100:
            raise ConfigError(f"memory_threshold: a percentage 0-100 (0: off), got {self.memory_threshold:g}")
        if self.memory_source not in ("system", "process"):
            raise ConfigError(f"memory_source: 'system' or 'process', got {self.memory_source!r}")
        if self.memory_interval <= 0:
            raise ConfigError("memory_interval: must be > 0")
        if self.http:
            host, sep, port = self.http.rpartition(":")
            if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ConfigError(f"http: expected HOST:PORT (port 0 picks a free one), got {self.http!r}")


def default_run_dir() -> Path:
    """``$INFERD_RUN_DIR``, else ``$XDG_RUNTIME_DIR/inferd``, else ``/tmp/inferd-UID``."""
    if os.environ.get("INFERD_RUN_DIR"):
        return Path(os.environ["INFERD_RUN_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "inferd"
    return Path(f"/tmp/inferd-{os.getuid()}")


_TOP_KEYS = {"models", "max_loaded", "watchdog", "health_timeout", "load_timeout", "stop_grace",
             "child_shutdown_grace", "bind_retries", "track_external_calls", "run_dir", "log_dir",
             "memory_threshold", "memory_source", "memory_interval", "http"}
_WD_KEYS = {"busy_timeout", "idle_timeout", "interval", "force_eviction_when_busy"}
_MODEL_KEYS = {"name", "backend", "model", "options", "env", "port", "parallel", "pinned", "group", "ray"}


def config_from_dict(data: Mapping[str, Any], base_dir: Path | None = None) -> SupervisorConfig:
    """Build and validate a config from the parsed YAML document."""
    if not isinstance(data, Mapping):
        raise ConfigError("the models file must be a mapping with a 'models' list")
    _no_unknown(data, _TOP_KEYS, "top level")
    wd = data.get("watchdog") or {}
    if not isinstance(wd, Mapping):
        raise ConfigError("watchdog: must be a mapping")
    _no_unknown(wd, _WD_KEYS, "watchdog")
    raw_models = data.get("models") or []
    if not isinstance(raw_models, list):
        raise ConfigError("models: must be a list")
    specs = []
    for i, m in enumerate(raw_models):
        if not isinstance(m, Mapping):
            raise ConfigError(f"models[{i}]: must be a mapping")
        _no_unknown(m, _MODEL_KEYS, f"models[{i}]")
        model = str(m.get("model", "") or "")
        if model and base_dir is not None and model.startswith("./"):
            model = str((base_dir / model).resolve())
        specs.append(ModelSpec(
            name=str(m.get("name", "")),
            backend=str(m.get("backend", "")),
            model=model,
            options=dict(m.get("options") or {}),
            env={str(k): str(v) for k, v in (m.get("env") or {}).items()},
            port=int(m.get("port", 0) or 0),
            parallel=bool(m.get("parallel", False)),
            pinned=bool(m.get("pinned", False)),
            group=str(m.get("group", "") or ""),
            ray=_mapping(m.get("ray"), f"models[{i}].ray"),
        ))
    kw: dict[str, Any] = {"models": tuple(specs)}
    for key in ("max_loaded", "bind_retries"):
        if key in data:
            kw[key] = int(data[key])
    for key in ("health_timeout", "load_timeout", "stop_grace", "child_shutdown_grace"):
        if key in data:
            kw[key] = parse_duration(data[key], key) or 0.0
    if "memory_threshold" in data:
        kw["memory_threshold"] = parse_percent(data["memory_threshold"], "memory_threshold")
    if "memory_source" in data:
        kw["memory_source"] = str(data["memory_source"])
    if "memory_interval" in data:
        kw["memory_interval"] = parse_duration(data["memory_interval"], "memory_interval") or 1.0
    for key in ("run_dir", "log_dir", "http"):
        if data.get(key):
            kw[key] = str(data[key])
    if "track_external_calls" in data:
        kw["track_external_calls"] = bool(data["track_external_calls"])
    kw["busy_timeout"] = parse_duration(wd.get("busy_timeout"), "watchdog.busy_timeout")
    kw["idle_timeout"] = parse_duration(wd.get("idle_timeout"), "watchdog.idle_timeout")
    if "interval" in wd:
        kw["watchdog_interval"] = parse_duration(wd["interval"], "watchdog.interval") or 0.5
    kw["force_eviction_when_busy"] = bool(wd.get("force_eviction_when_busy", False))
    cfg = SupervisorConfig(**kw)
    cfg.validate()
    return cfg


def load_config(path: str | os.PathLike[str]) -> SupervisorConfig:
    """Read ``models.yaml``; relative ``./model`` paths resolve against its directory."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    return config_from_dict(data or {}, p.resolve().parent)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a mapping")
    return dict(value)


def _no_unknown(m: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(m) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                          f"allowed: {', '.join(sorted(allowed))}")
