"""Every RPC passes through :class:`CallGuard`: undecodable requests and the calls a drain waits for.

grpc.aio answers ``UNKNOWN`` (and logs a traceback) when a request
deserializer raises: bad UTF-8 in a string field, a corrupt wire format. The
guard wraps each method's deserializer so that such bytes reach the handler
as a marker instead, and the handler answers ``INVALID_ARGUMENT`` with the
authsvc ErrorInfo, for every service on the server (AuthService, Health,
reflection). It also notes when each call reached a handler, which is all a
drain can see of the calls grpc.aio accepted (see :func:`service.server.drain`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.errors import DOMAIN, InvalidArgument, status_of
from service.logs import fields

log = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # the class is not generic at runtime
Req = TypeVar("Req")
Resp = TypeVar("Resp")

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class _Undecodable:
    """Stands in for a request message whose bytes did not decode."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def wrapped(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf DecodeError, and whatever else a parser may raise
            return _Undecodable(type(exc).__name__)

    return wrapped


async def abort(context: Context, code: grpc.StatusCode, message: str, reason: str) -> NoReturn:
    """End the call with ``code``, ``message`` and the authsvc ``google.rpc.ErrorInfo`` carrying ``reason``."""
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returns only by raising")


async def _refuse(context: Context, method: str, bad: _Undecodable) -> NoReturn:
    error = InvalidArgument("request message does not decode")
    log.info("rpc", extra=fields(method=method, code="INVALID_ARGUMENT", reason=error.reason, error=bad.error))
    await abort(context, status_of(error)[0], str(error), error.reason)


class CallGuard(grpc.aio.ServerInterceptor):
    """Answers undecodable requests ``INVALID_ARGUMENT``; counts calls for the drain."""

    def __init__(self) -> None:
        self.active = 0
        self.last_started = time.monotonic()
        # method -> (the service's handler, our wrapping of it): wrapped once, not per call.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def settled(self, quiet_s: float, timeout_s: float) -> bool:
        """Wait until no call (health probes aside) has reached a handler for ``quiet_s`` (at most ``timeout_s``).

        grpc.aio takes accepted calls from the core one at a time; those not yet
        taken are cancelled by ``server.stop()``. A quiet spell means there are none left.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            wait = self.last_started + quiet_s - now
            if wait <= 0:
                return True
            if now + wait > deadline:
                return False
            await asyncio.sleep(wait)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        method = handler_call_details.method
        if not method.startswith(HEALTH_PREFIX):  # probes go on during a drain; they may be cut
            self.last_started = time.monotonic()
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        assert handler.request_deserializer is not None
        lenient = _lenient(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_unary(method, handler.unary_unary), lenient, serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(method, handler.unary_stream), lenient, serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_unary(method, handler.stream_unary), lenient, serializer
            )
        if handler.stream_stream is not None:
            behavior = self._stream_stream(method, handler.stream_stream)
            return grpc.stream_stream_rpc_method_handler(behavior, lenient, serializer)
        return handler

    def _unary_unary(self, method: str, inner: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def behavior(request: Any, context: Context) -> Any:
            if isinstance(request, _Undecodable):
                await _refuse(context, method, request)
            self.active += 1
            try:
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                self.active -= 1

        return behavior

    def _unary_stream(self, method: str, inner: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def behavior(request: Any, context: Context) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await _refuse(context, method, request)
            self.active += 1
            try:
                result = inner(request, context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        yield response
                elif inspect.isawaitable(result):
                    await result  # a handler that writes with context.write()
            finally:
                self.active -= 1

        return behavior

    def _requests(self, method: str, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Undecodable):
                    await _refuse(context, method, request)
                yield request

        return checked()

    def _stream_unary(self, method: str, inner: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def behavior(requests: AsyncIterator[Any], context: Context) -> Any:
            result = inner(self._requests(method, requests, context), context)
            return await result if inspect.isawaitable(result) else result

        return behavior

    def _stream_stream(self, method: str, inner: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def behavior(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            result = inner(self._requests(method, requests, context), context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            elif inspect.isawaitable(result):
                await result

        return behavior
