"""The one error table: most specific row wins."""

from __future__ import annotations

from http import HTTPStatus

import grpc
import pytest

from service import errors
from service.errors import status_of


@pytest.mark.parametrize(
    ("exc", "code", "http", "reason"),
    [
        (errors.TokenExpired("x"), grpc.StatusCode.UNAUTHENTICATED, HTTPStatus.UNAUTHORIZED, "TOKEN_EXPIRED"),
        (errors.SignatureInvalid("x"), grpc.StatusCode.UNAUTHENTICATED, HTTPStatus.UNAUTHORIZED, "SIGNATURE_INVALID"),
        (errors.InvalidEvent("x"), grpc.StatusCode.INVALID_ARGUMENT, HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT"),
        (
            errors.PayloadTooLarge("x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
        ),
        (errors.SessionRevoked("x"), grpc.StatusCode.UNAUTHENTICATED, HTTPStatus.UNAUTHORIZED, "SESSION_REVOKED"),
        (errors.SessionPending("x"), grpc.StatusCode.UNAUTHENTICATED, HTTPStatus.UNAUTHORIZED, "SESSION_PENDING"),
        (
            errors.ImpersonationNotAllowed("x"),
            grpc.StatusCode.PERMISSION_DENIED,
            HTTPStatus.FORBIDDEN,
            "IMPERSONATION_NOT_ALLOWED",
        ),
        (
            errors.ReverificationRequired("x"),
            grpc.StatusCode.PERMISSION_DENIED,
            HTTPStatus.FORBIDDEN,
            "REVERIFICATION_REQUIRED",
        ),
        (errors.RoleTooLow("x"), grpc.StatusCode.PERMISSION_DENIED, HTTPStatus.FORBIDDEN, "ROLE_TOO_LOW"),
        (
            errors.CallerUnauthenticated("x"),
            grpc.StatusCode.UNAUTHENTICATED,
            HTTPStatus.UNAUTHORIZED,
            "CALLER_UNAUTHENTICATED",
        ),
        (errors.CallerNotAllowed("x"), grpc.StatusCode.PERMISSION_DENIED, HTTPStatus.FORBIDDEN, "CALLER_NOT_ALLOWED"),
        (errors.UserNotFound("x"), grpc.StatusCode.NOT_FOUND, HTTPStatus.NOT_FOUND, "USER_NOT_FOUND"),
        (errors.LastSuperadmin("x"), grpc.StatusCode.FAILED_PRECONDITION, HTTPStatus.CONFLICT, "LAST_SUPERADMIN"),
        (errors.TargetInactive("x"), grpc.StatusCode.FAILED_PRECONDITION, HTTPStatus.CONFLICT, "USER_INACTIVE"),
        (
            errors.DatabaseUnavailable("x"),
            grpc.StatusCode.UNAVAILABLE,
            HTTPStatus.SERVICE_UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        ),
        (errors.JwksUnavailable("x"), grpc.StatusCode.UNAVAILABLE, HTTPStatus.SERVICE_UNAVAILABLE, "JWKS_UNAVAILABLE"),
    ],
)
def test_status_of_walks_the_mro(exc: errors.AuthError, code: grpc.StatusCode, http: HTTPStatus, reason: str) -> None:
    assert status_of(exc) == (code, http)
    assert exc.reason == reason


def test_every_reason_of_the_design_exists() -> None:
    reasons = {
        cls.reason for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.AuthError)
    }
    design = {
        "TOKEN_MISSING",
        "TOKEN_TOO_LARGE",
        "TOKEN_MALFORMED",
        "TOKEN_UNSUPPORTED_ALG",
        "TOKEN_INVALID_SIGNATURE",
        "KEY_NOT_FOUND",
        "TOKEN_EXPIRED",
        "TOKEN_NOT_YET_VALID",
        "TOKEN_INVALID_ISSUER",
        "TOKEN_INVALID_AZP",
        "TOKEN_INVALID_AUDIENCE",
        "JWKS_UNAVAILABLE",
        "USER_INACTIVE",
        "USER_NOT_SYNCED",
        "USER_NOT_FOUND",
        "ROLE_TOO_LOW",
        "CALLER_NOT_SUPERADMIN",
        "LAST_SUPERADMIN",
        "INVALID_ARGUMENT",
        "DATABASE_UNAVAILABLE",
        "CLERK_UNAVAILABLE",
        "CLERK_KEY_REFUSED",
        "CLERK_USER_NOT_FOUND",
        "CLERK_REJECTED",
        "SESSION_PENDING",
        "SESSION_REVOKED",
        "IMPERSONATION_NOT_ALLOWED",
        "REVERIFICATION_REQUIRED",
        "CALLER_UNAUTHENTICATED",
        "CALLER_NOT_ALLOWED",
    }
    assert design <= reasons


def test_no_client_error_maps_to_internal_or_unknown() -> None:
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.AuthError) and cls is not errors.AuthError:
            assert status_of(cls("x"))[0] not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), cls
