"""Typed errors of authsvc calls, each carrying the ``google.rpc.ErrorInfo`` reason the server sent."""

from __future__ import annotations

import grpc

from authsvc_client import richstatus


class AuthsvcError(Exception):
    """A failed authsvc call: ``code`` is the gRPC status, ``reason`` the ErrorInfo reason (None if absent)."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, reason: str | None = None, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class Unauthenticated(AuthsvcError):
    """The token is missing or bad (``TOKEN_EXPIRED``, ``TOKEN_INVALID_SIGNATURE``, ...)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(AuthsvcError):
    """A valid token that is not allowed (``ROLE_TOO_LOW``, ``USER_INACTIVE``, ``USER_NOT_SYNCED``, ...)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(AuthsvcError):
    """No such user (``USER_NOT_FOUND``)."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(AuthsvcError):
    """A malformed request (``INVALID_ARGUMENT``)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(AuthsvcError):
    """The change is not possible now (``LAST_SUPERADMIN``, ``USER_INACTIVE`` target)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(AuthsvcError):
    """authsvc or one of its dependencies is unreachable (``DATABASE_UNAVAILABLE``, ``JWKS_UNAVAILABLE``, ...)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(AuthsvcError):
    """No answer within the call's deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[AuthsvcError]] = {
    cls.code: cls
    for cls in (Unauthenticated, PermissionDenied, NotFound, InvalidArgument, FailedPrecondition, Unavailable)
}
_BY_CODE[grpc.StatusCode.DEADLINE_EXCEEDED] = DeadlineExceeded


def from_rpc_error(err: grpc.aio.AioRpcError) -> AuthsvcError:
    """The typed error of a failed call, with the reason from its ``grpc-status-details-bin`` trailer."""
    info = richstatus.from_metadata(err.trailing_metadata())
    code = err.code()
    cls = _BY_CODE.get(code, AuthsvcError)
    return cls(err.details() or code.name, info.reason if info else None, code)
