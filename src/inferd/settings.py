"""One settings object for the server, read from CLI flags and environment variables.

Precedence: command-line flag > environment variable > default. Every field is
declared once below with its env name, flag and help text; ``inferd serve --help``
and the README's table come from the same declarations. Invalid values raise
``SettingsError`` with one line naming the setting, and ``inferd serve`` prints that
line and exits with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

MiB = 1024 * 1024


class SettingsError(ValueError):
    """A setting has an invalid value; the message is one actionable line."""


def _opt(default: Any, env: str | tuple[str, ...] | None, flag: str | None, help: str) -> Any:
    envs = (env,) if isinstance(env, str) else (env or ())
    return field(default=default, metadata={"env": envs, "flag": flag, "help": help})


@dataclass(frozen=True)
class Settings:
    """Server configuration. See the README's configuration table."""

    backend: str = _opt("llama-cpp", "INFERD_BACKEND", "--backend",
                        "backend to serve: a registered name (inferd backends) or module:Class")
    model: str = _opt("", "INFERD_MODEL", "--model",
                      "model to load at start (path or name); empty: the backend's packaged default")
    load_on_start: bool = _opt(True, "INFERD_LOAD_ON_START", "--load-on-start",
                               "load the model at start (false: wait for LoadModel, as LocalAI does)")
    model_options: str = _opt("", "INFERD_MODEL_OPTIONS", "--model-options",
                              "extra ModelOptions for the start-up load, as protobuf JSON")
    addr: str = _opt("", "INFERD_ADDR", "--addr",
                     "HOST:PORT to listen on (LocalAI's flag); overrides --host/GRPC_PORT")
    host: str = _opt("127.0.0.1", "INFERD_HOST", "--host", "interface to bind (0.0.0.0 for all)")
    port: int = _opt(50051, "GRPC_PORT", "--port", "port to listen on (0: pick a free port)")
    max_workers: int = _opt(10, ("PYTHON_GRPC_MAX_WORKERS", "GRPC_MAX_WORKERS"), "--max-workers",
                            "threads running blocking model work")
    max_message_size: int = _opt(100 * MiB, "GRPC_MAX_MESSAGE_SIZE", "--max-message-size",
                                 "largest request/reply in bytes; larger -> RESOURCE_EXHAUSTED")
    max_concurrent_rpcs: int = _opt(100, "GRPC_MAX_CONCURRENT_RPCS", "--max-concurrent-rpcs",
                                    "rpcs in flight; the excess is refused with RESOURCE_EXHAUSTED")
    enable_reflection: bool = _opt(True, "GRPC_ENABLE_REFLECTION", "--reflection",
                                   "serve gRPC server reflection (v1 and v1alpha)")
    require_api_key: bool = _opt(False, "GRPC_REQUIRE_API_KEY", "--require-api-key",
                                 "refuse rpcs without the API key (x-api-key or Bearer)")
    api_key: str = _opt("", "GRPC_API_KEY", "--api-key", "the API key")
    localai_auth_token: str = _opt("", "LOCALAI_GRPC_AUTH_TOKEN", "--auth-token",
                                   "LocalAI's bearer token (authorization: Bearer TOKEN)")
    health_open: bool = _opt(False, "INFERD_HEALTH_OPEN", "--health-open",
                             "let grpc.health.v1 answer without credentials (for probes)")
    use_tls: bool = _opt(False, "GRPC_USE_TLS", "--tls", "serve TLS")
    cert_file: str = _opt("/etc/inference/certs/server.crt", "GRPC_CERT_FILE", "--cert-file",
                          "server certificate (PEM)")
    key_file: str = _opt("/etc/inference/certs/server.key", "GRPC_KEY_FILE", "--key-file",
                         "server private key (PEM)")
    client_ca_file: str = _opt("", "GRPC_CLIENT_CA_FILE", "--client-ca-file",
                               "CA bundle for client certificates: enables and requires mTLS")
    shutdown_grace: float = _opt(10.0, "INFERD_SHUTDOWN_GRACE", "--shutdown-grace",
                                 "seconds in-flight calls get to finish on SIGTERM/SIGINT")
    drain_timeout: float = _opt(30.0, "INFERD_DRAIN_TIMEOUT", "--drain-timeout",
                                "seconds LoadModel/Free wait for calls in flight to stop before giving up")
    load_timeout: float = _opt(600.0, "INFERD_LOAD_TIMEOUT", "--load-timeout",
                               "seconds a LoadModel/Free may take; past it the caller gets the failure")
    watch_parent: bool = _opt(True, "INFERD_WATCH_PARENT", "--watch-parent",
                              "exit when the parent process dies (LocalAI's parent-death watch)")
    store_path: str = _opt("", "INFERD_STORE_PATH", "--store-path",
                           "local-store: directory for a durable store (empty: memory only)")
    models_dir: str = _opt("", "INFERD_MODELS_DIR", "--models-dir",
                           "when set, model, LoRA, dataset, job and store paths must stay inside it")
    audio_dir: str = _opt("", "INFERD_AUDIO_DIR", "--audio-dir",
                          "when set, TTS output and transcription input paths must stay inside it")
    images_dir: str = _opt("", "INFERD_IMAGES_DIR", "--images-dir",
                           "when set, image paths (Detect src, GenerateImage src/dst) must stay inside it")
    log_level: str = _opt("info", "INFERD_LOG_LEVEL", "--log-level", "debug, info, warning, error")
    log_format: str = _opt("text", "INFERD_LOG_FORMAT", "--log-format",
                           "text, or json: one object per line with rpc, model, correlation id, duration")
    job_spare: bool = _opt(True, "INFERD_JOB_SPARE", "--job-spare",
                           "after the first quantization job, keep one pre-started job process (~50 MB) "
                           "so the next starts without ~0.4 s of process start")
    metrics_port: int = _opt(0, "INFERD_METRICS_PORT", "--metrics-port",
                             "serve Prometheus /metrics on this HTTP port (0: off)")
    services: str = _opt("all", "INFERD_SERVICES", "--services",
                         "gRPC services to serve: all, or a comma list of backend, llm, inference")

    # ---- derived -----------------------------------------------------------------
    @property
    def listen_address(self) -> str:
        return self.addr or f"{self.host}:{self.port}"

    @property
    def service_set(self) -> frozenset[str]:
        """The gRPC services to serve (``--services``)."""
        text = self.services.strip().lower()
        if text == "all":
            return frozenset(SERVICES)
        return frozenset(p.strip() for p in text.split(",") if p.strip())

    @property
    def api_keys(self) -> tuple[str, ...]:
        """Every accepted credential (GRPC_API_KEY and LocalAI's token)."""
        return tuple(k for k in (self.api_key if self.require_api_key else "", self.localai_auth_token) if k)

    # ---- construction ------------------------------------------------------------
    @classmethod
    def load(cls, argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default ``os.environ``) then ``argv`` flags."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            for name in f.metadata["env"]:
                if name in env and env[name] != "":
                    values[f.name] = _convert(f.name, name, env[name], type(f.default))
                    break
        if argv:
            ns = cls.argument_parser().parse_args(argv)
            for f in fields(cls):
                v = getattr(ns, f.name, None)
                if v is not None:
                    values[f.name] = _convert(f.name, f.metadata["flag"], v, type(f.default))
        settings = cls(**values)
        settings.validate()
        return settings

    def with_overrides(self, **kw: Any) -> Settings:
        s = replace(self, **kw)
        s.validate()
        return s

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per setting; values stay None unless given (env/default apply)."""
        for f in fields(cls):
            flag = f.metadata["flag"]
            envs = "/".join(f.metadata["env"])
            default = f.default if f.default != "" else "''"
            help_text = f"{f.metadata['help']} [env {envs}; default {default}]"
            if isinstance(f.default, bool):
                parser.add_argument(flag, dest=f.name, nargs="?", const="true", default=None,
                                    metavar="BOOL", help=help_text)
            else:
                parser.add_argument(flag, dest=f.name, default=None, help=help_text)

    @classmethod
    def argument_parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="inferd serve", add_help=False)
        cls.add_arguments(p)
        return p

    def validate(self) -> None:
        if self.addr:
            _split_addr(self.addr)
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"GRPC_PORT: must be 0-65535, got {self.port}")
        for name, minimum in (("max_workers", 1), ("max_message_size", 1024), ("max_concurrent_rpcs", 1)):
            if getattr(self, name) < minimum:
                raise SettingsError(f"{_env_of(name)}: must be >= {minimum}, got {getattr(self, name)}")
        for name in ("drain_timeout", "load_timeout"):
            if not 0 < getattr(self, name) < float("inf"):
                raise SettingsError(f"{_env_of(name)}: must be a positive number of seconds, got {getattr(self, name)}")
        if self.shutdown_grace < 0:
            raise SettingsError(f"INFERD_SHUTDOWN_GRACE: must be >= 0, got {self.shutdown_grace}")
        if self.require_api_key and not self.api_key:
            raise SettingsError("GRPC_REQUIRE_API_KEY is true but GRPC_API_KEY is empty: set the key")
        if self.use_tls:
            for name in ("cert_file", "key_file"):
                path = getattr(self, name)
                if not os.path.isfile(path):
                    raise SettingsError(f"{_env_of(name)}: TLS is on but '{path}' is not a readable file")
        if self.client_ca_file:
            if not self.use_tls:
                raise SettingsError("GRPC_CLIENT_CA_FILE is set (mTLS) but GRPC_USE_TLS is false")
            if not os.path.isfile(self.client_ca_file):
                raise SettingsError(f"GRPC_CLIENT_CA_FILE: '{self.client_ca_file}' is not a readable file")
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"INFERD_LOG_FORMAT: text or json; got {self.log_format!r}")
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"INFERD_METRICS_PORT: must be 0-65535 (0: off), got {self.metrics_port}")
        unknown = set(self.service_set) - set(SERVICES)
        if unknown or not self.service_set:
            raise SettingsError(f"INFERD_SERVICES: 'all' or a comma list of {', '.join(SERVICES)}; "
                                f"got {self.services!r}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"INFERD_LOG_LEVEL: one of debug, info, warning, error; got {self.log_level!r}")


def _env_of(name: str) -> str:
    for f in fields(Settings):
        if f.name == name:
            return f.metadata["env"][0]
    return name


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"--addr: expected HOST:PORT, got {addr!r}")
    return host or "0.0.0.0", int(port)


# The gRPC services ``--services`` can name: backend.Backend, seed 003's LLMService, seed 002's Inference.
SERVICES = ("backend", "llm", "inference")

# The boolean spellings every inferd setting and option accepts (shared with backends.options).
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def _convert(name: str, source: str, raw: Any, kind: type) -> Any:
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    try:
        if kind is bool:
            if text.lower() in TRUE_WORDS:
                return True
            if text.lower() in FALSE_WORDS:
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        kind_name = "true/false" if kind is bool else kind.__name__
        raise SettingsError(f"{source}: expected {kind_name}, got {raw!r}") from None
    return text


def settings_table() -> str:
    """The README's configuration table, generated from the declarations."""
    rows = ["| env | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for f in fields(Settings):
        default = f.default
        if f.name == "max_message_size":
            default = f"{default} (100 MiB)"
        rows.append(
            f"| {' / '.join(f.metadata['env'])} | `{f.metadata['flag']}` | `{default}` | {f.metadata['help']} |"
        )
    return "\n".join(rows)
