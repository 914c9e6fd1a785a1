"""Where a session token comes from: ``authorization: Bearer`` metadata or header, else the ``__session`` cookie.

One rule for every edge: the gRPC server and interceptor (metadata), the
aiohttp and ASGI middleware and Envoy's Check (HTTP headers). A bad
``authorization`` header is an error and never falls back to the cookie.
"""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie

SESSION_COOKIE = "__session"


class MalformedAuthorization(ValueError):
    """An ``authorization`` value that is not ``Bearer <token>``."""


def parse_bearer(value: str) -> str:
    """The token of ``Bearer <token>`` (scheme case-insensitive; may be empty); raise if not that shape."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise MalformedAuthorization("authorization must be 'Bearer <token>'")
    return token.strip()


def http_token(authorization: str | None, cookie: str | None) -> str | None:
    """The token of an HTTP request: the bearer header if present (it must be well formed), else the cookie."""
    if authorization is not None:
        token = parse_bearer(authorization)
        if not token:
            raise MalformedAuthorization("authorization must be 'Bearer <token>'")
        return token
    if cookie:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(cookie)
        except CookieError:
            return None
        morsel = jar.get(SESSION_COOKIE)
        if morsel is not None and morsel.value:
            return morsel.value
    return None
