"""``grpc_server_*`` metrics for every RPC the server serves (AuthService, Health, reflection), as a server interceptor.

go-grpc-prometheus's names and labels: ``grpc_server_started_total``,
``grpc_server_handled_total`` (with ``grpc_code``) and
``grpc_server_handling_seconds``. The interceptor wraps each method's handler
once, the first time the method is called, and keeps the wrapped handler; per
call it costs one dict lookup, two counter increments and one histogram
observation on label children resolved ahead of time (``make bench`` measures it).

Every call but gRPC health is also counted in ``authsvc_calls_total`` under
its caller (:data:`service.callers.current_caller`, which the caller check
sets inside the call; empty when no caller is known) and its short method name.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
from prometheus_client import Counter, Histogram

from service.callers import current_caller
from service.calls import HEALTH_PREFIX
from service.metrics import CALLS, GRPC_HANDLED, GRPC_HANDLING_SECONDS, GRPC_STARTED

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"


class _Method:
    """The metric children of one method: started, latency, handled per code, calls per caller (made on first use)."""

    __slots__ = ("by_caller", "handled", "labels", "latency", "started")

    def __init__(self, grpc_type: str, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        self.labels = (grpc_type, service, method)
        self.started: Counter = GRPC_STARTED.labels(*self.labels)
        self.latency: Histogram = GRPC_HANDLING_SECONDS.labels(*self.labels)
        self.handled: dict[grpc.StatusCode, Counter] = {}
        # Health is open to everyone (and its Check is not Envoy's): nobody's call.
        self.by_caller: dict[tuple[str, grpc.StatusCode], Counter] | None = (
            None if full_method.startswith(HEALTH_PREFIX) else {}
        )

    def done(self, code: grpc.StatusCode, began: float) -> None:
        self.latency.observe(time.perf_counter() - began)
        counter = self.handled.get(code)
        if counter is None:
            counter = self.handled[code] = GRPC_HANDLED.labels(*self.labels, code.name)
        counter.inc()
        if self.by_caller is not None:
            caller = current_caller.get()
            calls = self.by_caller.get((caller, code))
            if calls is None:
                calls = self.by_caller[caller, code] = CALLS.labels(caller, self.labels[2], code.name)
            calls.inc()


def code_of(context: Context, exc: BaseException | None) -> grpc.StatusCode:
    """The code a call's client receives, once its behavior returned or raised ``exc``."""
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code: grpc.StatusCode | None = context.code()
    if code is not None:
        return code
    return grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN


def _wrap_unary_response(m: _Method, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: Context) -> Any:
        m.started.inc()
        began = time.perf_counter()
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            m.done(code_of(context, exc), began)
            raise
        m.done(code_of(context, None), began)
        return response

    return wrapped


def _wrap_stream_response(m: _Method, behavior: Callable[..., Any]) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        return _wrap_unary_response(m, behavior)  # a coroutine writing with context.write()

    async def wrapped(request: Any, context: Context) -> AsyncIterator[Any]:
        m.started.inc()
        began = time.perf_counter()
        try:
            async for response in behavior(request, context):
                yield response
        except BaseException as exc:
            m.done(code_of(context, exc), began)
            raise
        m.done(code_of(context, None), began)

    return wrapped


def _wrap(handler: Handler, full_method: str) -> Handler:
    h: Any = handler  # at run time grpc's handlers are namedtuples
    if h.unary_unary is not None:
        m = _Method("unary", full_method)
        return cast(Handler, h._replace(unary_unary=_wrap_unary_response(m, h.unary_unary)))
    if h.stream_unary is not None:
        m = _Method("client_stream", full_method)
        return cast(Handler, h._replace(stream_unary=_wrap_unary_response(m, h.stream_unary)))
    if h.unary_stream is not None:
        m = _Method("server_stream", full_method)
        return cast(Handler, h._replace(unary_stream=_wrap_stream_response(m, h.unary_stream)))
    m = _Method("bidi_stream", full_method)
    return cast(Handler, h._replace(stream_stream=_wrap_stream_response(m, h.stream_stream)))


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC; unknown methods (answered UNIMPLEMENTED by grpc) are not counted."""

    def __init__(self) -> None:
        # method -> (the handler grpc found, our wrapper of it); any later interceptor still runs
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        entry = self._wrapped.get(method)
        if entry is None or entry[0] is not handler:
            entry = self._wrapped[method] = (handler, _wrap(handler, method))
        return entry[1]
