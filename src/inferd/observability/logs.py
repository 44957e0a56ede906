"""Log setup for every inferd process: human text lines or one JSON object per line.

``--log-format json`` makes each record a JSON object with ``ts``, ``level``,
``logger`` and ``msg``, plus the call fields the access log adds (``rpc``, ``model``,
``correlation_id``, ``duration_ms``, ``code``, ``front``), so a log shipper can index
calls without parsing prose. Exceptions travel as ``exc``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Fields the access log sets with ``extra=``; the JSON formatter copies them out.
CALL_FIELDS = ("front", "rpc", "model", "correlation_id", "duration_ms", "code", "peer")

access_log = logging.getLogger("inferd.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (UTF-8, no embedded newlines)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CALL_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    """Install one stderr handler on the root logger with the chosen format (replaces earlier ones)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())


def log_call(front: str, rpc: str, model: str, correlation_id: str, duration_s: float, code: str) -> None:
    """The access-log line of one finished call."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    ms = round(duration_s * 1000.0, 3)
    access_log.info("%s %s model=%s code=%s %.1fms id=%s", front, rpc, model or "-", code, ms, correlation_id,
                    extra={"front": front, "rpc": rpc, "model": model, "correlation_id": correlation_id,
                           "duration_ms": ms, "code": code})
