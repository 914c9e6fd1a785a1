"""Where a session token comes from: ``authorization: Bearer`` metadata or header, else the ``__session`` cookie.

One rule for every edge: the gRPC server and interceptor (metadata), the
aiohttp and ASGI middleware and Envoy's Check (HTTP headers). A bad
``authorization`` header is an error and never falls back to the cookie.

The Cookie header is read as browsers write it and Envoy reads it, never
with :class:`http.cookies.SimpleCookie` (which gives up on a whole header for
one JSON value, space, backslash or non-ASCII byte in any other cookie):
split on ``;``, the name is everything before the first ``=``, whitespace
around name and value is dropped, a value in double quotes loses them, and
anything else is tolerated. Of several ``__session`` cookies the first
non-empty one wins: browsers send the cookie of the most specific path
first, and Clerk's SDKs and Envoy also take the first.
"""

from __future__ import annotations

from collections.abc import Iterable

SESSION_COOKIE = "__session"
COOKIE_SEPARATOR = "; "  # how repeated Cookie header lines (HTTP/2 sends one per cookie) make one list
_WHITESPACE = " \t"


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
    return session_cookie(cookie)


def join_cookie_headers(values: Iterable[str]) -> str:
    """Several ``cookie`` header lines as the one cookie list they are."""
    return COOKIE_SEPARATOR.join(values)


def session_cookie(cookie: str | None) -> str | None:
    """The first non-empty ``__session`` value of a Cookie header (see the module docstring), else None."""
    for pair in (cookie or "").split(";"):
        name, equals, value = pair.partition("=")
        if not equals or name.strip(_WHITESPACE) != SESSION_COOKIE:
            continue
        value = value.strip(_WHITESPACE)
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if value:
            return value
    return None
