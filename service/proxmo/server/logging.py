"""Structured logs: one line per event, as text (``key=value`` tail) or as one JSON object.

Context goes in ``extra=``: ``log.info("request done", extra={"request_id": ..., "rpc": ...,
"code": ..., "rows": ..., "groups": ..., "ms": ...})``. Both formats show every extra field;
JSON lines always carry ``ts``, ``level``, ``logger`` and ``msg`` (and ``exc`` with the trace).
Every line has the secrets of the URLs in it masked (``proxmo.secrets``), whoever logged it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from proxmo.secrets import mask_urls

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "color_message", "taskName",
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


def _timestamp(record: logging.LogRecord) -> str:
    ms = int(record.msecs)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extra fields, exc (trace)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return mask_urls(json.dumps(entry, default=str, separators=(",", ":")))


class TextFormatter(logging.Formatter):
    """``ts level logger: msg key=value ...`` plus the trace on the following lines."""

    def format(self, record: logging.LogRecord) -> str:
        tail = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if tail:
            line = f"{line} {tail}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return mask_urls(line)


def configure_logging(log_format: str, level: str) -> None:
    """Route every logger (ours, uvicorn's, grpc's) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        named = logging.getLogger(name)
        named.handlers[:] = []
        named.propagate = True
    # Per-request REST access lines duplicate our own request log; keep them at debug.
    logging.getLogger("uvicorn.access").setLevel(
        logging.DEBUG if level.lower() == "debug" else logging.WARNING
    )
