"""aiohttp middleware: each request's session token is verified by authsvc before its handler runs.

The token is the ``Authorization: Bearer`` header, else the ``__session``
cookie (Clerk's). A denial is answered here: 401 (bad or missing token) or
403 (not allowed) with ``{"error": ..., "reason": ...}``; 503 when authsvc
cannot answer. The handler sees the caller as ``request[IDENTITY]`` and
:func:`current_identity`. Needs ``authsvc-client[aiohttp]`` (3.14 or later, for ``web.RequestKey``).

Minimum roles per route: decorate the handler with :func:`requires` (or
:func:`public` for routes without a check); others use ``default``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import hdrs, web

from authsvc_client.bearer import join_cookie_headers
from authsvc_client.client import AuthsvcClient
from authsvc_client.errors import AuthsvcError
from authsvc_client.httpauth import error_body, status_of, verify_request
from authsvc_client.identity import caller
from authsvc_client.models import Identity
from authsvc_client.roles import Role

IDENTITY = web.RequestKey("authsvc_identity", Identity)

_MIN_ROLE = "__authsvc_min_role__"
_PUBLIC = "__authsvc_public__"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
F = TypeVar("F")


def requires(role: Role | None) -> Callable[[F], F]:
    """Decorate a handler: at least ``role`` (None: any active user with a valid token)."""

    def mark(handler: F) -> F:
        setattr(handler, _MIN_ROLE, role)
        return handler

    return mark


def public(handler: F) -> F:
    """Decorate a handler that needs no token (health checks, the sign-in page)."""
    setattr(handler, _PUBLIC, True)
    return handler


def authsvc_middleware(client: AuthsvcClient, *, default: Role | None = None) -> Any:
    """The middleware: ``web.Application(middlewares=[authsvc_middleware(client)])``."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route_handler = request.match_info.handler
        if getattr(route_handler, _PUBLIC, False) or request.match_info.http_exception is not None:
            return await handler(request)
        min_role = getattr(route_handler, _MIN_ROLE, default)
        try:
            identity = await verify_request(
                client,
                request.headers.get(hdrs.AUTHORIZATION),
                join_cookie_headers(request.headers.getall(hdrs.COOKIE, ())),
                min_role,
            )
        except AuthsvcError as error:
            return web.json_response(error_body(error), status=status_of(error))
        request[IDENTITY] = identity
        reset = caller.set(identity)
        try:
            return await handler(request)
        finally:
            caller.reset(reset)

    return middleware
