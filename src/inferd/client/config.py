"""Seed 002's Go client configuration (``config.yaml``), read by the Python client.

The Go maistro service is configured with::

    inference:
      use_grpc: true
      grpc_address: "localhost:50051"
      use_secure_connection: false
      api_key: ""

``load_client_config(path)`` reads the same file (the keys at the top level or under
``inference:``) into an address and ``ChannelOptions``; ``client_from_config(path)`` /
``sync_client_from_config(path)`` return a ready client. ``use_grpc: false`` is refused
with a clear error: inferd's client speaks gRPC only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from inferd.client.transport import ChannelOptions

KEYS = ("use_grpc", "grpc_address", "use_secure_connection", "api_key")
_EXTRA = ("ca_file", "cert_file", "key_file", "server_name")  # inferd's additions for TLS details


class ClientConfigError(ValueError):
    """The config file is unusable; the message names the key."""


@dataclass(frozen=True)
class ClientConfig:
    address: str
    options: ChannelOptions


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ClientConfigError(f"{key}: expected true or false, got {value!r}")


def parse_client_config(data: Any) -> ClientConfig:
    if not isinstance(data, dict):
        raise ClientConfigError("the config must be a mapping (optionally under 'inference:')")
    section = data.get("inference", data)
    if not isinstance(section, dict):
        raise ClientConfigError("inference: must be a mapping")
    unknown = set(section) - set(KEYS) - set(_EXTRA)
    if unknown:
        raise ClientConfigError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                                f"allowed: {', '.join(KEYS + _EXTRA)}")
    if not _bool(section.get("use_grpc", True), "use_grpc"):
        raise ClientConfigError("use_grpc: false selects another transport; inferd's client speaks gRPC only")
    address = str(section.get("grpc_address", "") or "").strip()
    if not address:
        raise ClientConfigError("grpc_address: required (HOST:PORT)")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ClientConfigError(f"grpc_address: expected HOST:PORT, got {address!r}")
    extra = {k: str(section.get(k) or "") for k in _EXTRA}
    options = ChannelOptions(api_key=str(section.get("api_key") or ""),
                             tls=_bool(section.get("use_secure_connection", False), "use_secure_connection"),
                             **extra)
    return ClientConfig(address, options)


def load_client_config(path: str | os.PathLike[str]) -> ClientConfig:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ClientConfigError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ClientConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_client_config(data or {})


def client_from_config(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """An async ``Client`` configured by the Go client's ``config.yaml``."""
    from inferd.client import new_client

    cfg = load_client_config(path)
    return new_client(cfg.address, options=cfg.options, **kwargs)


def sync_client_from_config(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """A ``SyncClient`` configured by the Go client's ``config.yaml``."""
    from inferd.client import new_sync_client

    cfg = load_client_config(path)
    return new_sync_client(cfg.address, options=cfg.options, **kwargs)
