"""JSON-lines logging on stderr (stdlib logging, one formatter).

Modules use ``log = logging.getLogger(__name__)`` and pass structured fields
with ``log.info("event", extra={"fields": {...}})``. Secrets and whole tokens
are never passed in. With tracing on, a line written inside a span carries
its ``trace_id`` and ``span_id`` (:class:`service.otel.SpanIds` stamps them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        trace_id = getattr(record, "trace_id", None)
        if trace_id is not None:
            entry["trace_id"], entry["span_id"] = trace_id, getattr(record, "span_id", None)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str = "info") -> None:
    """Route every logger to one JSON handler on stderr at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter stays at warning unless we debug.
    for noisy in ("pymongo", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


MAX_REQUEST_ID = 128
REQUEST_ID_HEADER = "x-request-id"  # gRPC metadata key and HTTP header (case-insensitive there)


def request_id(given: str | None) -> str:
    """The ``request_id`` of a log line: the caller's ``x-request-id`` when it is 1-128 printable ASCII characters.

    Anything else (absent, empty, too long, a control or non-ASCII character) gets a random one.
    """
    if given and len(given) <= MAX_REQUEST_ID and given.isascii() and given.isprintable():
        return given
    return os.urandom(8).hex()


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a structured log line: ``log.info("x", extra=fields(a=1))``."""
    return {"fields": values}


# The log fields of the call being served (a dict per call, or None outside
# one): the edge opens it, the core adds to it with :func:`bind` (as
# structlog's ``bound_contextvars``), and the edge writes one line from it.
_call_fields: ContextVar[dict[str, Any] | None] = ContextVar("authsvc_call_fields", default=None)


@contextlib.contextmanager
def call_context() -> Iterator[dict[str, Any]]:
    """Open the log fields of one call; :func:`bind` adds to them until the block ends."""
    bound: dict[str, Any] = {}
    token = _call_fields.set(bound)
    try:
        yield bound
    finally:
        _call_fields.reset(token)


def bind(**values: Any) -> None:
    """Add ``values`` to the current call's log fields (nothing outside a call)."""
    bound = _call_fields.get()
    if bound is not None:
        bound.update(values)
