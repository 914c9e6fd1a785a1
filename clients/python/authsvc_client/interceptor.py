"""A grpc.aio server interceptor: every call carries ``authorization: Bearer`` metadata that authsvc verifies.

``AuthInterceptor(client, min_roles={"/shop.v1.Shop/Refund": Role.ADMIN}, default=None)``
protects every method of the server it is given to: the token is verified by
authsvc (with the method's minimum role, else ``default``; None means any
valid token of an active user). A denied call is answered by the interceptor
itself with authsvc's code, message and ErrorInfo reason (UNAUTHENTICATED,
PERMISSION_DENIED; UNAVAILABLE when authsvc cannot answer); the handler never
runs. An allowed call runs the handler with :func:`current_identity` set.
Health checks and reflection are public by default (``public``).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from typing import Any, NoReturn, TypeAlias

import grpc

from authsvc_client import richstatus
from authsvc_client.bearer import MalformedAuthorization, parse_bearer
from authsvc_client.client import AuthsvcClient
from authsvc_client.errors import AuthsvcError, DeadlineExceeded, Unauthenticated
from authsvc_client.identity import caller
from authsvc_client.models import Identity
from authsvc_client.paths import is_public
from authsvc_client.roles import Role

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
DOMAIN = "authsvc"
PUBLIC = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


async def abort(context: Context, error: AuthsvcError) -> NoReturn:
    """End the call with ``error``'s code and message and an ErrorInfo carrying its reason."""
    code = grpc.StatusCode.UNAVAILABLE if isinstance(error, DeadlineExceeded) else error.code
    reason = error.reason or code.name
    details = richstatus.encode(code.value[0], error.message, richstatus.ErrorInfo(reason=reason, domain=DOMAIN))
    await context.abort(code, error.message, trailing_metadata=((richstatus.DETAILS_KEY, details),))
    raise AssertionError("abort returns only by raising")


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc, unused-ignore]
    """Verify each call's bearer token through authsvc before its handler runs (see the module docstring).

    ``min_roles`` maps full method names (``/package.Service/Method``) to a
    minimum role (None: any valid token); methods not in it use ``default``.
    Methods under an entry of ``public`` (whole segments: ``/grpc.health.v1.Health``
    covers its methods, never ``/grpc.health.v1.HealthAdmin/…``) are not checked at all.
    """

    def __init__(
        self,
        client: AuthsvcClient,
        *,
        min_roles: Mapping[str, Role | None] | None = None,
        default: Role | None = None,
        public: Collection[str] = PUBLIC,
    ) -> None:
        self._client = client
        self._min_roles = dict(min_roles or {})
        self._default = default
        self._public = tuple(public)

    def min_role(self, method: str) -> Role | None:
        return self._min_roles.get(method, self._default)

    async def verify(self, method: str, context: Context) -> Identity:
        """The caller of ``method`` in ``context``, or the call is aborted with the denial."""
        token = None
        try:
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    token = parse_bearer(value if isinstance(value, str) else "")
                    break
            if not token:
                raise Unauthenticated("authorization metadata with a bearer token is required", "TOKEN_MISSING")
            return await self._client.verify(token, self.min_role(method))
        except MalformedAuthorization as exc:
            await abort(context, Unauthenticated(str(exc), "TOKEN_MALFORMED"))
        except AuthsvcError as exc:
            await abort(context, exc)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or is_public(method, self._public):
            return handler
        return _wrap(handler, lambda context: self.verify(method, context))


Verify = Callable[[Context], Awaitable[Identity]]


def _wrap(handler: Handler, verify: Verify) -> Handler:
    """``handler`` with ``verify`` run first and the identity set while the behaviour runs."""
    behaviour: Callable[..., Any] | None = (
        handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
    )
    if behaviour is None:
        return handler
    original: Callable[..., Any] = behaviour

    async def unary(request: Any, context: Context) -> Any:
        reset = caller.set(await verify(context))
        try:
            result = original(request, context)
            return await result if inspect.isawaitable(result) else result
        finally:
            caller.reset(reset)

    async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
        reset = caller.set(await verify(context))
        try:
            result = original(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):
                await result
            else:
                for item in result:
                    yield item
        finally:
            caller.reset(reset)

    serialization: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **serialization)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **serialization)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **serialization)
    return grpc.stream_stream_rpc_method_handler(streaming, **serialization)
