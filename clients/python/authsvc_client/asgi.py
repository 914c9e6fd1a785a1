"""ASGI middleware: the aiohttp middleware's rules for Starlette, FastAPI and any other ASGI app.

``app = AuthsvcASGI(app, client, default=Role.STAFF, min_roles={"/admin": Role.ADMIN}, public=("/healthz",))``.
``public`` entries match whole path segments (``/health`` and ``/health/...``, never
``/healthcheck``), of the path as sent and with its ``.``/``..`` segments resolved, both
of which must match. ``min_roles`` match path prefixes (the longest prefix wins), on each
of those readings, and the strictest role wins (:mod:`authsvc_client.paths`).
Denials are 401/403/503 with ``{"error", "reason"}``; a denied websocket is closed
with code 1008. The handler sees the caller in ``scope["state"]["authsvc_identity"]``
and :func:`current_identity`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping
from typing import Any

from authsvc_client.bearer import join_cookie_headers
from authsvc_client.client import AuthsvcClient
from authsvc_client.errors import AuthsvcError
from authsvc_client.httpauth import IDENTITY_KEY, error_body, status_of, verify_request
from authsvc_client.identity import caller
from authsvc_client.paths import is_public, readings
from authsvc_client.roles import Role

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class AuthsvcASGI:
    def __init__(
        self,
        app: App,
        client: AuthsvcClient,
        *,
        default: Role | None = None,
        min_roles: Mapping[str, Role | None] | None = None,
        public: Collection[str] = (),
    ) -> None:
        self._app = app
        self._client = client
        self._default = default
        self._min_roles = sorted((min_roles or {}).items(), key=lambda item: -len(item[0]))
        self._public = tuple(public)

    def min_role(self, path: str) -> Role | None:
        """The strictest role any reading of ``path`` requires (None: any valid token)."""
        roles = [self._prefix_role(view) for view in readings(path)]
        return max(roles, key=lambda role: 0 if role is None else int(role))

    def _prefix_role(self, path: str) -> Role | None:
        for prefix, role in self._min_roles:
            if path.startswith(prefix):
                return role
        return self._default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or is_public(path, self._public):
            await self._app(scope, receive, send)
            return
        authorization: str | None = None
        cookies: list[str] = []
        for key, value in scope.get("headers", ()):
            name = key.decode("latin-1").lower()
            if name == "authorization":
                authorization = value.decode("latin-1")
            elif name == "cookie":
                cookies.append(value.decode("latin-1"))
        try:
            identity = await verify_request(
                self._client, authorization, join_cookie_headers(cookies), self.min_role(path)
            )
        except AuthsvcError as error:
            await self._deny(scope, send, error)
            return
        scope.setdefault("state", {})[IDENTITY_KEY] = identity
        reset = caller.set(identity)
        try:
            await self._app(scope, receive, send)
        finally:
            caller.reset(reset)

    @staticmethod
    async def _deny(scope: Scope, send: Send, error: AuthsvcError) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(error_body(error)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status_of(error),
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
