"""Backends: adapters from the protocol's messages to engines. See ``base.Backend``."""

from inferd.backends.base import Backend
from inferd.backends.context import CallContext

__all__ = ["Backend", "CallContext"]
