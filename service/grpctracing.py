"""One server span per RPC, by OpenTelemetry's RPC conventions: the outermost interceptor of the gRPC server.

Each call's span is a child of the caller's W3C ``traceparent`` metadata (the
global propagator, ``OTEL_PROPAGATORS``), named ``authsvc.v1.AuthService/VerifyToken``
and so on, with ``rpc.system`` ``grpc``, ``rpc.service``, ``rpc.method``,
``rpc.grpc.status_code`` (the integer code the client receives) and, when
the call was denied, ``authsvc.reason`` (its ErrorInfo reason,
:data:`service.calls.current_reason`). Being outermost, the span covers the
caller check, the metrics and the per-RPC log line. gRPC health is not
traced: it is probes, not calls.

Why not opentelemetry-instrumentation-grpc's aio server interceptor (0.66b1):
it names spans with a leading slash (``/authsvc.v1.AuthService/VerifyToken``),
and it learns the status only from ``context.abort``/``set_code`` through a
proxy of the context, so a call ended with ``abort_with_status`` (how authsvc
sends every ErrorInfo) keeps ``rpc.grpc.status_code`` 0, as do a cancelled
call and one that raised (``UNKNOWN``). Here the code is read from the context
after the call, as the metrics read it (:func:`service.grpcmetrics.code_of`).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode

from service.calls import HEALTH_PREFIX, current_reason
from service.grpcmetrics import code_of

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"

REASON = "authsvc.reason"
# A server span's status is an error only for these codes (OpenTelemetry's gRPC conventions).
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class _Method:
    """How one method's spans are named and attributed."""

    __slots__ = ("attributes", "name", "tracer")

    def __init__(self, tracer: trace.Tracer, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        self.tracer = tracer
        self.name = f"{service}/{method}"
        self.attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

    def span(self, context: Context) -> trace.Span:
        """The call's server span, a child of its ``traceparent`` metadata when there is one."""
        parent = extract(dict(context.invocation_metadata() or ()))
        return self.tracer.start_span(self.name, parent, SpanKind.SERVER, self.attributes, record_exception=False)


def _end(span: trace.Span, context: Context, exc: BaseException | None) -> None:
    code = code_of(context, exc)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    reason = current_reason.get()
    if reason is not None:
        span.set_attribute(REASON, reason)
    if code in SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


def _unary_response(m: _Method, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: Context) -> Any:
        span = m.span(context)
        with trace.use_span(span, record_exception=False, set_status_on_exception=False):
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                _end(span, context, exc)
                raise
            _end(span, context, None)
            return response

    return wrapped


def _stream_response(m: _Method, behavior: Callable[..., Any]) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        return _unary_response(m, behavior)  # a coroutine writing with context.write()

    async def wrapped(request: Any, context: Context) -> AsyncIterator[Any]:
        span = m.span(context)
        with trace.use_span(span, record_exception=False, set_status_on_exception=False):
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                _end(span, context, exc)
                raise
            _end(span, context, None)

    return wrapped


def _wrap(handler: Handler, m: _Method) -> Handler:
    h: Any = handler  # at run time grpc's handlers are namedtuples
    if h.unary_unary is not None:
        return cast(Handler, h._replace(unary_unary=_unary_response(m, h.unary_unary)))
    if h.stream_unary is not None:
        return cast(Handler, h._replace(stream_unary=_unary_response(m, h.stream_unary)))
    if h.unary_stream is not None:
        return cast(Handler, h._replace(unary_stream=_stream_response(m, h.unary_stream)))
    return cast(Handler, h._replace(stream_stream=_stream_response(m, h.stream_stream)))


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Opens a server span around every call but health's; unknown methods get none."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        # method -> (the handler grpc found, our wrapper of it), as in the metrics interceptor
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        entry = self._wrapped.get(method)
        if entry is None or entry[0] is not handler:
            entry = self._wrapped[method] = (handler, _wrap(handler, _Method(self._tracer, method)))
        return entry[1]
