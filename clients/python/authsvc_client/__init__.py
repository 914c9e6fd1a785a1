"""authsvc for calling services: ``AuthsvcClient``, typed results and errors, ``current_identity``.

The interceptor (:mod:`authsvc_client.interceptor`), the aiohttp middleware
(:mod:`authsvc_client.aiohttp`) and the ASGI middleware (:mod:`authsvc_client.asgi`)
are imported from their modules; the generated stubs are :mod:`authsvc_client.v1`.
"""

from __future__ import annotations

from authsvc_client.client import AuthsvcClient
from authsvc_client.errors import (
    AuthsvcError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from authsvc_client.identity import current_identity
from authsvc_client.models import Identity, User
from authsvc_client.roles import Role

__all__ = [
    "AuthsvcClient",
    "AuthsvcError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Identity",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Role",
    "Unauthenticated",
    "Unavailable",
    "User",
    "current_identity",
]
