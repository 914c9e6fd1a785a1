"""The HTTP side shared by the aiohttp and ASGI middleware: verify a request, shape a denial."""

from __future__ import annotations

from typing import Any

from authsvc_client.bearer import MalformedAuthorization, http_token
from authsvc_client.client import AuthsvcClient
from authsvc_client.errors import AuthsvcError, PermissionDenied, Unauthenticated
from authsvc_client.models import Identity
from authsvc_client.roles import Role

IDENTITY_KEY = "authsvc_identity"


def status_of(error: AuthsvcError) -> int:
    """The HTTP status of a denial: 401, 403, else 503 (authsvc could not answer)."""
    if isinstance(error, Unauthenticated):
        return 401
    if isinstance(error, PermissionDenied):
        return 403
    return 503


def error_body(error: AuthsvcError) -> dict[str, Any]:
    return {"error": error.message, "reason": error.reason or error.code.name}


async def verify_request(
    client: AuthsvcClient, authorization: str | None, cookie: str | None, min_role: Role | None
) -> Identity:
    """The caller of an HTTP request; raises the :class:`AuthsvcError` of its denial."""
    try:
        token = http_token(authorization, cookie)
    except MalformedAuthorization as exc:
        raise Unauthenticated(str(exc), "TOKEN_MALFORMED") from None
    if token is None:
        raise Unauthenticated("a bearer token or the __session cookie is required", "TOKEN_MISSING")
    return await client.verify(token, min_role)
