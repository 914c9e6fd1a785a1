"""The domain error tree and the one table that maps it to gRPC codes and HTTP statuses.

Foreign errors (pyjwt, pymongo, aiohttp) are translated where they enter; the
edges (servicer, webhook handlers) only look up :func:`status_of`.
``str(exc)`` of an :class:`AuthError` is always safe to send to a caller.
"""

from __future__ import annotations

from http import HTTPStatus

import grpc

DOMAIN = "authsvc"


class AuthError(Exception):
    """Base of errors a caller may see."""

    reason = "INTERNAL"


# --- request shape -----------------------------------------------------------
class InvalidArgument(AuthError):
    reason = "INVALID_ARGUMENT"


class InvalidEvent(InvalidArgument):
    """A signed webhook body that is not a valid Clerk event."""


# --- tokens -------------------------------------------------------------------
class TokenError(AuthError):
    reason = "TOKEN_MALFORMED"


class TokenMissing(TokenError):
    reason = "TOKEN_MISSING"


class TokenTooLarge(TokenError):
    reason = "TOKEN_TOO_LARGE"


class TokenMalformed(TokenError):
    reason = "TOKEN_MALFORMED"


class TokenUnsupportedAlg(TokenError):
    reason = "TOKEN_UNSUPPORTED_ALG"


class TokenInvalidSignature(TokenError):
    reason = "TOKEN_INVALID_SIGNATURE"


class KeyNotFound(TokenError):
    reason = "KEY_NOT_FOUND"


class TokenExpired(TokenError):
    reason = "TOKEN_EXPIRED"


class TokenNotYetValid(TokenError):
    reason = "TOKEN_NOT_YET_VALID"


class TokenInvalidIssuer(TokenError):
    reason = "TOKEN_INVALID_ISSUER"


class TokenInvalidAzp(TokenError):
    reason = "TOKEN_INVALID_AZP"


class TokenInvalidAudience(TokenError):
    reason = "TOKEN_INVALID_AUDIENCE"


# --- sessions (a valid token of a session that may not be used) ---------------
class SessionPending(TokenError):
    """The session still has tasks to finish (``sts: pending``): signed out, as Clerk's SDKs treat it."""

    reason = "SESSION_PENDING"


class SessionRevoked(TokenError):
    """Clerk ended, removed or revoked the token's session (``sid``)."""

    reason = "SESSION_REVOKED"


# --- webhook signatures ------------------------------------------------------
class SignatureInvalid(AuthError):
    """Svix headers missing, signature wrong, or timestamp outside tolerance."""

    reason = "SIGNATURE_INVALID"


class PayloadTooLarge(AuthError):
    reason = "PAYLOAD_TOO_LARGE"


# --- authorization -----------------------------------------------------------
class PermissionDenied(AuthError):
    reason = "PERMISSION_DENIED"


class UserInactive(PermissionDenied):
    reason = "USER_INACTIVE"


class UserNotSynced(PermissionDenied):
    reason = "USER_NOT_SYNCED"


class RoleTooLow(PermissionDenied):
    reason = "ROLE_TOO_LOW"


class CallerNotSuperadmin(PermissionDenied):
    reason = "CALLER_NOT_SUPERADMIN"


class ImpersonationNotAllowed(PermissionDenied):
    """SetRole from an impersonated session (a token with an ``act`` claim)."""

    reason = "IMPERSONATION_NOT_ALLOWED"


class ReverificationRequired(PermissionDenied):
    """SetRole needs a second factor verified more recently (``fva``, ``AUTHSVC_SETROLE_MAX_FACTOR_AGE_MIN``)."""

    reason = "REVERIFICATION_REQUIRED"


class UserNotFound(AuthError):
    reason = "USER_NOT_FOUND"


# --- callers (AUTHSVC_CALLERS_FILE) ------------------------------------------
class CallerUnauthenticated(AuthError):
    """No key or client certificate name of a known caller: nothing says which keys exist."""

    reason = "CALLER_UNAUTHENTICATED"


class CallerNotAllowed(PermissionDenied):
    """A known caller, calling a method outside its ``methods``."""

    reason = "CALLER_NOT_ALLOWED"


class FailedPrecondition(AuthError):
    reason = "FAILED_PRECONDITION"


class LastSuperadmin(FailedPrecondition):
    reason = "LAST_SUPERADMIN"


class TargetInactive(FailedPrecondition):
    """SetRole on a user that is deleted, banned or locked."""

    reason = "USER_INACTIVE"


class ClerkUserNotFound(FailedPrecondition):
    """Clerk has no such user (404), though MongoDB has it: deleted in Clerk, its webhook not yet applied."""

    reason = "CLERK_USER_NOT_FOUND"


class ClerkRejected(FailedPrecondition):
    """Clerk refused the request itself (400, 422 or another 4xx): retrying it would not help."""

    reason = "CLERK_REJECTED"


# --- dependencies ------------------------------------------------------------
class Unavailable(AuthError):
    reason = "UNAVAILABLE"


class DatabaseUnavailable(Unavailable):
    reason = "DATABASE_UNAVAILABLE"


class JwksUnavailable(Unavailable):
    reason = "JWKS_UNAVAILABLE"


class ClerkUnavailable(Unavailable):
    """Clerk did not answer, or kept answering 5xx or 429, within the retry policy."""

    reason = "CLERK_UNAVAILABLE"


class ClerkKeyRefused(ClerkUnavailable):
    """Clerk refused ``CLERK_SECRET_KEY`` (401/403): an operator must fix the key."""

    reason = "CLERK_KEY_REFUSED"


STATUS: dict[type[AuthError], tuple[grpc.StatusCode, HTTPStatus]] = {
    AuthError: (grpc.StatusCode.INTERNAL, HTTPStatus.INTERNAL_SERVER_ERROR),
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, HTTPStatus.BAD_REQUEST),
    TokenError: (grpc.StatusCode.UNAUTHENTICATED, HTTPStatus.UNAUTHORIZED),
    SignatureInvalid: (grpc.StatusCode.UNAUTHENTICATED, HTTPStatus.UNAUTHORIZED),
    CallerUnauthenticated: (grpc.StatusCode.UNAUTHENTICATED, HTTPStatus.UNAUTHORIZED),
    PayloadTooLarge: (grpc.StatusCode.INVALID_ARGUMENT, HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
    PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, HTTPStatus.FORBIDDEN),
    UserNotFound: (grpc.StatusCode.NOT_FOUND, HTTPStatus.NOT_FOUND),
    FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, HTTPStatus.CONFLICT),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, HTTPStatus.SERVICE_UNAVAILABLE),
}


def status_of(exc: AuthError) -> tuple[grpc.StatusCode, HTTPStatus]:
    """The (gRPC code, HTTP status) of ``exc``: the most specific row of :data:`STATUS` wins."""
    for cls in type(exc).__mro__:
        row = STATUS.get(cls)
        if row is not None:
            return row
    return STATUS[AuthError]
