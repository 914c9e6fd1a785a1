"""Envoy external authorization: ``envoy.service.auth.v3.Authorization/Check`` over the VerifyToken rules.

With ``AUTHSVC_EXT_AUTHZ=on`` the gRPC server serves this beside AuthService,
so services in any language can sit behind Envoy's ``ext_authz`` filter.
Translation only: the token comes from the ``authorization`` header, else the
``__session`` cookie (:func:`authsvc_client.bearer.http_token`, the rule the
Python middleware uses too); the minimum role from the route's
``context_extensions["min_role"]``; the decision from
:func:`service.access.authorize` over the same user reader as VerifyToken.

- allowed: OK, ``x-authsvc-user-id``/``-role``/``-session-id`` (and ``-actor``
  for an impersonated session) overwrite
  whatever the client sent, and every other client header in authsvc's
  namespace is removed (:func:`spoofable`: ``x_authsvc_role`` too, which
  CGI-style backends read as ``x-authsvc-role``);
- denied: an OK RPC whose ``CheckResponse`` carries UNAUTHENTICATED/401 or
  PERMISSION_DENIED/403 and a JSON body ``{"error", "reason"}``; a caller
  that ``AUTHSVC_CALLERS_FILE`` refuses (Envoy itself, without its key) is
  denied the same way (401 ``CALLER_UNAUTHENTICATED``, 403
  ``CALLER_NOT_ALLOWED``), so that it fails closed whatever Envoy's
  ``failure_mode_allow`` (:class:`service.calls.CallGuard` answers it);
- database or JWKS down: the RPC fails UNAVAILABLE (Envoy applies its
  ``failure_mode_allow``/``status_on_error``); an unknown ``min_role`` fails
  it INVALID_ARGUMENT, never allows.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeAlias, TypeVar

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import status_pb2

from authsvc_client.bearer import MalformedAuthorization, http_token, join_cookie_headers
from service.access import UserReader, authorize
from service.calls import current_reason
from service.errors import (
    AuthError,
    InvalidArgument,
    PermissionDenied,
    TokenError,
    TokenMalformed,
    TokenMissing,
    status_of,
)
from service.metrics import DENIALS
from service.roles import Role
from service.sessions import SessionRules
from service.tokens import TokenVerifier

SERVICE_NAME: str = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
CHECK = f"/{SERVICE_NAME}/Check"
PREFIX = "x-authsvc-"
USER_ID, ROLE, SESSION_ID = f"{PREFIX}user-id", f"{PREFIX}role", f"{PREFIX}session-id"
ACTOR = f"{PREFIX}actor"

T = TypeVar("T")
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Serve = Callable[[str, Context, Callable[[], Awaitable[T]]], Awaitable[T]]

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def request_headers(request: external_auth_pb2.CheckRequest) -> dict[str, str]:
    """The HTTP request's headers, lower-cased (``header_map`` when Envoy sends raw headers).

    Repeated headers are joined as HTTP joins them, with ``,``; repeated
    ``cookie`` headers are one cookie list, joined with ``; ``.
    """
    http = request.attributes.request.http
    headers = {key.lower(): value for key, value in http.headers.items()}
    for entry in http.header_map.headers:
        value = entry.value or entry.raw_value.decode("utf-8", "replace")
        key = entry.key.lower()
        if key in headers:
            value = join_cookie_headers((headers[key], value)) if key == "cookie" else f"{headers[key]},{value}"
        headers[key] = value
    return headers


def min_role_of(request: external_auth_pb2.CheckRequest) -> Role | None:
    """The route's ``min_role`` context extension; absent or empty is none; unknown is :class:`InvalidArgument`."""
    raw = request.attributes.context_extensions.get("min_role", "")
    if not raw:
        return None
    role = Role.parse(raw)
    if role is None:
        raise InvalidArgument(f"context_extensions min_role {raw[:32]!r} is not staff, admin or superadmin")
    return role


def spoofable(name: str) -> bool:
    """Whether a client header claims authsvc's namespace: ``x-authsvc-…`` in any case, ``_`` read as ``-``."""
    return name.lower().replace("_", "-").startswith(PREFIX)


def headers_to_remove(headers: Iterable[str], ours: Iterable[base_pb2.HeaderValueOption]) -> list[str]:
    """The client's headers in authsvc's namespace, but for those ``ours`` overwrites."""
    kept = {option.header.key for option in ours}
    return sorted(name for name in headers if spoofable(name) and name not in kept)


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def _denied(error: AuthError) -> external_auth_pb2.CheckResponse:
    code, http = status_of(error)
    current_reason.set(error.reason)  # the call's span names the reason, as for an aborted call
    body = json.dumps({"error": str(error), "reason": error.reason})
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code.value[0], message=str(error)),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=int(http)),
            headers=[_header("content-type", "application/json")],
            body=body,
        ),
    )


class ExtAuthzServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """``envoy.service.auth.v3.Authorization``: Check, by the rules of VerifyToken.

    ``serve`` is the servicer's call wrapper (one log line, AuthError → status).
    """

    def __init__(self, verifier: TokenVerifier, users: UserReader, sessions: SessionRules, serve: Serve[Any]) -> None:
        self._verifier = verifier
        self._users = users
        self._sessions = sessions
        self._serve = serve

    def add_to(self, server: grpc.aio.Server) -> None:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self, server)

    @property
    def answers(self) -> Mapping[str, Callable[[AuthError], Any]]:
        """A refused caller of Check gets a denied ``CheckResponse``, never a failed RPC."""
        return {CHECK: _denied}

    async def Check(self, request: external_auth_pb2.CheckRequest, context: Context) -> external_auth_pb2.CheckResponse:
        async def handle() -> external_auth_pb2.CheckResponse:
            headers = request_headers(request)
            min_role = min_role_of(request)
            try:
                try:
                    token = http_token(headers.get("authorization"), headers.get("cookie"))
                except MalformedAuthorization as exc:
                    raise TokenMalformed(str(exc)) from None
                if token is None:
                    raise TokenMissing("a bearer token or the __session cookie is required")
                verified, user = await authorize(self._verifier, self._users, self._sessions, token, min_role)
            except (TokenError, PermissionDenied) as exc:
                DENIALS.labels(method="Check", reason=exc.reason).inc()
                return _denied(exc)
            ours = [_header(USER_ID, verified.subject)]
            if verified.session_id:
                ours.append(_header(SESSION_ID, verified.session_id))
            if verified.actor:
                ours.append(_header(ACTOR, verified.actor))
            if user is not None:
                ours.append(_header(ROLE, user.role.wire))
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=grpc.StatusCode.OK.value[0]),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=ours, headers_to_remove=headers_to_remove(headers, ours)
                ),
            )

        result: external_auth_pb2.CheckResponse = await self._serve("Check", context, handle)
        return result
