"""The per-RPC log line: one JSON line per call, written as ``AUTHSVC_LOG_RPCS`` says.

``all`` (the default) writes a line for every call, ``errors`` only for calls
that did not end ``OK``, ``off`` none. A call that failed unexpectedly
(``INTERNAL``) is always written, with its traceback: that is an error report,
not traffic. The servicer and the call guard (caller refusals, undecodable
requests) both write through :class:`RpcLog`, so every line has the same
fields: ``method``, ``caller``, ``request_id`` (the caller's ``x-request-id``
metadata when usable, see :func:`service.logs.request_id`), ``peer``,
``code``, ``reason`` and what the writer adds.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType
from typing import Any, TypeAlias

import grpc

from service import logs
from service.callers import current_caller
from service.settings import LogRpcs

log = logging.getLogger("service.servicer")  # the logger the line has always come from

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def request_id_of(context: Context) -> str:
    """The call's ``x-request-id`` metadata when it is usable, else a random id."""
    for key, value in context.invocation_metadata() or ():
        if key == logs.REQUEST_ID_HEADER and isinstance(value, str):  # a -bin key would be bytes
            return logs.request_id(value)
    return logs.request_id(None)


class RpcLog:
    """Writes the per-RPC line of a call, or not, per ``mode`` (``AUTHSVC_LOG_RPCS``)."""

    __slots__ = ("mode",)

    def __init__(self, mode: LogRpcs = "all") -> None:
        self.mode = mode

    def write(
        self,
        context: Context,
        method: str,
        code: grpc.StatusCode,
        reason: str | None,
        *,
        started: float | None = None,
        failure: ExcInfo | None = None,
        request_id: str | None = None,
        **more: object,
    ) -> None:
        """One line for the call ``method`` that ended with ``code`` (and ErrorInfo ``reason``)."""
        if failure is None and (self.mode == "off" or (self.mode == "errors" and code is grpc.StatusCode.OK)):
            return
        if failure is not None:
            level = logging.ERROR
        elif code is grpc.StatusCode.UNAVAILABLE:
            level = logging.WARNING
        else:
            level = logging.INFO
        if not log.isEnabledFor(level):  # the hot path pays for nothing it does not log
            return
        line: dict[str, object] = dict(
            method=method,
            caller=current_caller.get() or None,
            request_id=request_id or request_id_of(context),
            peer=context.peer(),
            code=code.name,
            reason=reason,
        )
        if started is not None:
            line["duration_ms"] = round((time.perf_counter() - started) * 1000, 2)
        line.update(more)
        log.log(level, "rpc", exc_info=failure, extra=logs.fields(**line))
