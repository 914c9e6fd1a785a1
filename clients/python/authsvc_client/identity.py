"""The verified caller of the request being handled, for handlers behind the interceptor or middleware."""

from __future__ import annotations

from contextvars import ContextVar

from authsvc_client.models import Identity

caller: ContextVar[Identity | None] = ContextVar("authsvc_caller", default=None)


def current_identity() -> Identity:
    """The identity verified for the current request; ``LookupError`` outside a protected handler."""
    identity = caller.get()
    if identity is None:
        raise LookupError("no authsvc identity: this code does not run inside a protected handler")
    return identity
