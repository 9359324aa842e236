"""llmd's log lines: text (journald adds the time) or one JSON object per line, each carrying the
id of the proxied request it belongs to, if any.

A request's id is the client's `X-Request-Id` when it is a sane token, else a fresh one; the
proxy puts it in this module's context variable, so every line logged while the request is
handled, and in the tasks it starts (a load, say), carries it, and so do the events recorded
meanwhile."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os
import random
import re
import sys

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "llmd_request_id", default=None
)
HEADER = "X-Request-Id"
# What a client's id may look like to be kept as it is (else llmd makes one).
_SANE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
FORMATS = ("text", "json")


def new_id(incoming: str | None) -> str:
    """The id of a new request: the client's if it is a sane token, else 16 hex digits."""
    if incoming and _SANE.fullmatch(incoming):
        return incoming
    return f"{random.getrandbits(64):016x}"  # not a secret: os.urandom is a syscall a request


class _WithRequestId(logging.Filter):
    """Sets record.request_id (None outside a request) and record.rid (" [req ID]" or "")."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        record.request_id = rid
        record.rid = f" [req {rid}]" if rid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and request_id
    and exc (the traceback) when there are."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            doc["request_id"] = rid
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of a [daemon] log_format."""
    if fmt == "json":
        return JsonFormatter()
    text = "%(levelname)s %(name)s: %(message)s%(rid)s"
    # Under systemd the journal adds its own timestamps.
    if "JOURNAL_STREAM" not in os.environ:
        text = "%(asctime)s " + text
    return logging.Formatter(text)


def setup(level: str, fmt: str) -> logging.Handler:
    """llmd's one handler, on stderr; returns it (for the repeat filter and for reloads)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_WithRequestId())
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return handler


def configure(level: str, fmt: str) -> None:
    """Apply a reloaded [daemon] log_level and log_format."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for h in root.handlers:
        h.setFormatter(formatter(fmt))
