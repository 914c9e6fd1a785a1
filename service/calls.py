"""Every RPC passes through :class:`CallGuard`: the caller check, undecodable requests, the calls a drain waits for.

With ``AUTHSVC_CALLERS_FILE``, each call but gRPC health is first checked
against the callers policy (:mod:`service.callers`): its ``x-authsvc-key``
metadata, else the URI and DNS SANs of its client certificate, must name a
known caller (``UNAUTHENTICATED`` ``CALLER_UNAUTHENTICATED``) that may call
the method (``PERMISSION_DENIED`` ``CALLER_NOT_ALLOWED``). Nothing of the call
runs before that, not even the decoding of its request: the guard takes the
request as bytes (no deserializer for grpc to run) and decodes it itself once
the caller is admitted. A refused call touches no database. Envoy's Check
answers a refusal with a denied ``CheckResponse`` instead (``answers``), so
that Envoy's ``failure_mode_allow`` never opens the door to an unknown caller.

grpc.aio answers ``UNKNOWN`` (and logs a traceback) when a request
deserializer raises: bad UTF-8 in a string field, a corrupt wire format. The
guard decodes leniently, so that such bytes reach the handler as a marker
instead, and answers ``INVALID_ARGUMENT`` with the authsvc ErrorInfo, for
every service on the server (AuthService, Health, reflection). It also notes
when each call reached a handler, which is all a drain can see of the calls
grpc.aio accepted (see :func:`service.server.drain`).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.callerfile import CallersFile
from service.callers import KEY_METADATA, Caller, CallerPolicy, current_caller
from service.errors import DOMAIN, AuthError, CallerNotAllowed, CallerUnauthenticated, InvalidArgument, status_of
from service.metrics import DENIALS
from service.rpclog import RpcLog

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # the class is not generic at runtime
Req = TypeVar("Req")
Resp = TypeVar("Resp")
# A method whose refusals are answered with a response (Envoy's denied CheckResponse) instead of a status.
Answer: TypeAlias = Callable[[AuthError], Any]

HEALTH_PREFIX = "/grpc.health.v1.Health/"
# The auth-context properties of a verified client certificate's URI and DNS SANs (grpc core's names;
# x509_subject_alternative_name would mix in email and IP SANs).
SAN_PROPERTIES = ("peer_uri", "peer_dns")

# The ErrorInfo reason the current call was denied with (set by :func:`abort` and Envoy's denied
# CheckResponse), for its trace span (:mod:`service.grpctracing`); each call runs in its own task.
current_reason: ContextVar[str | None] = ContextVar("authsvc_reason", default=None)


class _Undecodable:
    """Stands in for a request message whose bytes did not decode."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    if deserialize is None:
        return lambda data: data

    def wrapped(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf DecodeError, and whatever else a parser may raise
            return _Undecodable(type(exc).__name__)

    return wrapped


def caller_of(policy: CallerPolicy, context: Context) -> Caller | None:
    """The caller of this call: by its ``x-authsvc-key`` metadata, else by its client certificate's SANs."""
    for key, value in context.invocation_metadata() or ():
        if key == KEY_METADATA and isinstance(value, str):  # a -bin key would be bytes
            caller = policy.by_key(value)
            if caller is not None:
                return caller
            break
    if not policy.uses_sans:  # the TLS peer is only read when some caller is named by it
        return None
    auth = context.auth_context()
    return policy.by_san(value.decode("utf-8", "replace") for name in SAN_PROPERTIES for value in auth.get(name, ()))


class CallerGate:
    """The caller check of one method: who calls, and may they call it."""

    __slots__ = ("answer", "callers", "method", "rpc_log")

    def __init__(self, method: str, callers: CallersFile, answer: Answer | None, rpc_log: RpcLog) -> None:
        self.method = method.rpartition("/")[2]  # the short name, as the callers file names it
        self.callers = callers
        self.answer = answer
        self.rpc_log = rpc_log

    def refusal(self, context: Context) -> AuthError | None:
        """Why this call may not proceed, or None; notes the caller for the log line and the metrics."""
        caller = caller_of(self.callers.policy, context)
        if caller is None:
            return CallerUnauthenticated("unknown caller: send a caller key (x-authsvc-key) or a listed certificate")
        current_caller.set(caller.name)
        if not caller.allows(self.method):
            return CallerNotAllowed(f"caller {caller.name!r} may not call {self.method}")
        return None

    async def refuse(self, context: Context, error: AuthError) -> Any:
        """End the call refused: a status with ErrorInfo, or the method's own denial response."""
        code = status_of(error)[0]
        DENIALS.labels(self.method, error.reason).inc()
        self.rpc_log.write(context, self.method, code if self.answer is None else grpc.StatusCode.OK, error.reason)
        if self.answer is not None:
            return self.answer(error)
        await abort(context, code, str(error), error.reason)


async def abort(context: Context, code: grpc.StatusCode, message: str, reason: str) -> NoReturn:
    """End the call with ``code``, ``message`` and the authsvc ``google.rpc.ErrorInfo`` carrying ``reason``."""
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    current_reason.set(reason)
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returns only by raising")


async def _refuse(context: Context, method: str, bad: _Undecodable, rpc_log: RpcLog) -> NoReturn:
    error = InvalidArgument("request message does not decode")
    code = status_of(error)[0]
    rpc_log.write(context, method, code, error.reason, error=bad.error)
    await abort(context, code, str(error), error.reason)


async def _admit(gate: CallerGate | None, context: Context) -> None:
    """For streaming methods (no denial response): end the call unless its caller may make it."""
    if gate is not None:
        refusal = gate.refusal(context)
        if refusal is not None:
            await gate.refuse(context, refusal)
            raise AssertionError("a streaming method's refusal ends the call")


class CallGuard(grpc.aio.ServerInterceptor):
    """Checks the caller (with ``callers``), answers undecodable requests ``INVALID_ARGUMENT``, counts calls.

    ``answers``: for a full method name, the response that answers a refused caller instead of a status.
    ``rpc_log`` writes the line of a call it ends.
    """

    def __init__(
        self,
        callers: CallersFile | None = None,
        answers: Mapping[str, Answer] | None = None,
        rpc_log: RpcLog | None = None,
    ) -> None:
        self._callers = callers
        self._answers = dict(answers or {})
        self._log = rpc_log or RpcLog()
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
        if handler is None:
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        # The requests arrive as bytes (no deserializer): each behavior decodes them after the caller check.
        decode = _lenient(handler.request_deserializer)
        gate = None
        if self._callers is not None and not method.startswith(HEALTH_PREFIX):
            answer = self._answers.get(method) if handler.unary_unary is not None else None
            gate = CallerGate(method, self._callers, answer, self._log)
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            unary = self._unary_unary(method, handler.unary_unary, gate, decode)
            return grpc.unary_unary_rpc_method_handler(unary, None, serializer)
        if handler.unary_stream is not None:
            streaming = self._unary_stream(method, handler.unary_stream, gate, decode)
            return grpc.unary_stream_rpc_method_handler(streaming, None, serializer)
        if handler.stream_unary is not None:
            unary = self._stream_unary(method, handler.stream_unary, gate, decode)
            return grpc.stream_unary_rpc_method_handler(unary, None, serializer)
        if handler.stream_stream is not None:
            streaming = self._stream_stream(method, handler.stream_stream, gate, decode)
            return grpc.stream_stream_rpc_method_handler(streaming, None, serializer)
        return handler

    def _unary_unary(
        self, method: str, inner: Callable[..., Any], gate: CallerGate | None, decode: Callable[[bytes], Any]
    ) -> Callable[..., Awaitable[Any]]:
        async def behavior(raw: bytes, context: Context) -> Any:
            if gate is not None:
                refusal = gate.refusal(context)
                if refusal is not None:
                    return await gate.refuse(context, refusal)
            request = decode(raw)
            if isinstance(request, _Undecodable):
                await _refuse(context, method, request, self._log)
            self.active += 1
            try:
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                self.active -= 1

        return behavior

    def _unary_stream(
        self, method: str, inner: Callable[..., Any], gate: CallerGate | None, decode: Callable[[bytes], Any]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def behavior(raw: bytes, context: Context) -> AsyncIterator[Any]:
            await _admit(gate, context)
            request = decode(raw)
            if isinstance(request, _Undecodable):
                await _refuse(context, method, request, self._log)
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

    def _requests(
        self, method: str, requests: AsyncIterator[bytes], context: Context, decode: Callable[[bytes], Any]
    ) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for raw in requests:
                request = decode(raw)
                if isinstance(request, _Undecodable):
                    await _refuse(context, method, request, self._log)
                yield request

        return checked()

    def _stream_unary(
        self, method: str, inner: Callable[..., Any], gate: CallerGate | None, decode: Callable[[bytes], Any]
    ) -> Callable[..., Awaitable[Any]]:
        async def behavior(requests: AsyncIterator[bytes], context: Context) -> Any:
            await _admit(gate, context)
            result = inner(self._requests(method, requests, context, decode), context)
            return await result if inspect.isawaitable(result) else result

        return behavior

    def _stream_stream(
        self, method: str, inner: Callable[..., Any], gate: CallerGate | None, decode: Callable[[bytes], Any]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def behavior(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
            await _admit(gate, context)
            result = inner(self._requests(method, requests, context, decode), context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            elif inspect.isawaitable(result):
                await result

        return behavior
