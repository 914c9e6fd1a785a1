"""AuthService over gRPC: proto <-> domain only.

Each RPC is one call into :mod:`service.access` or the store. An
:class:`AuthError` becomes its status code (from :func:`status_of`), its
message and a ``google.rpc.ErrorInfo`` detail; anything else is logged with
its traceback and answered ``INTERNAL`` with a request id, never its text.
Every call writes exactly one JSON log line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from types import TracebackType
from typing import Any, NoReturn, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from protos.authsvc.v1 import authsvc_pb2, authsvc_pb2_grpc
from service.access import MAX_EXTERNAL_ID, RoleAdmin, UserReader, authorize, check_external_id
from service.clerk import ClerkBackend
from service.errors import DOMAIN, AuthError, InvalidArgument, TokenMalformed, UserNotFound, status_of
from service.logs import fields
from service.roles import Role
from service.tokens import TokenVerifier, VerifiedToken
from service.users import UserRecord, UserStore

log = logging.getLogger(__name__)

T = TypeVar("T")
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

# JSON numbers are doubles: larger integers would silently lose digits.
_MAX_SAFE_INT = 2**53


def role_from_proto(value: int) -> Role | None:
    """The domain role of a proto enum value; None for ROLE_UNSPECIFIED and unknown numbers."""
    try:
        return Role(value)
    except ValueError:
        return None


def _timestamp(target: Any, value: datetime | None) -> None:
    if value is not None:
        target.FromDatetime(value)


def user_message(record: UserRecord) -> authsvc_pb2.User:
    """The ``User`` message of a stored user; absent times stay unset."""
    message = authsvc_pb2.User(
        external_id=record.external_id,
        name=record.name,
        email=record.email or "",
        role=f"ROLE_{record.role.name}",
        is_active=record.is_active,
    )
    _timestamp(message.created_at, record.created_at)
    _timestamp(message.updated_at, record.updated_at)
    _timestamp(message.last_login_at, record.last_login_at)
    return message


def json_safe(value: Any) -> Any:
    """``value`` as something ``google.protobuf.Struct`` holds exactly: odd numbers become strings."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if abs(value) <= _MAX_SAFE_INT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return str(value)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of ``authorization: Bearer <token>`` (scheme case-insensitive); None when absent."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if not isinstance(value, str):
            raise TokenMalformed("authorization metadata must be 'Bearer <token>'")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise TokenMalformed("authorization metadata must be 'Bearer <token>'")
        return token.strip() or None
    return None


def verify_response(verified: VerifiedToken, user: UserRecord | None) -> authsvc_pb2.VerifyTokenResponse:
    """The ``VerifyTokenResponse`` of a verified token and its user (if synced)."""
    response = authsvc_pb2.VerifyTokenResponse(
        subject=verified.subject,
        session_id=verified.session_id,
        authorized_party=verified.authorized_party,
    )
    response.expires_at.FromDatetime(verified.expires_at)
    if user is not None:
        response.user.CopyFrom(user_message(user))
    response.claims.update(json_safe(verified.claims))
    return response


class _ResponseMemo:
    """Built responses per token, reused while the verifier and the user cache return the same objects.

    Both cache their results, so a token presented again yields the identical
    ``VerifiedToken`` and ``UserRecord``; building the message (claims Struct,
    timestamps) is then most of a call's own cost. Identity, not equality,
    decides reuse: any new verification or user read builds afresh.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._entries: OrderedDict[str, tuple[VerifiedToken, UserRecord | None, authsvc_pb2.VerifyTokenResponse]] = (
            OrderedDict()
        )

    def get(self, token: str, verified: VerifiedToken, user: UserRecord | None) -> authsvc_pb2.VerifyTokenResponse:
        entry = self._entries.get(token)
        if entry is not None and entry[0] is verified and entry[1] is user:
            self._entries.move_to_end(token)
            return entry[2]
        response = verify_response(verified, user)
        self._entries[token] = (verified, user, response)
        self._entries.move_to_end(token)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return response


class _Call:
    """What the one log line of a call reports."""

    def __init__(self, rpc: str) -> None:
        self.rpc = rpc
        self._request_id: str | None = None
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.reason: str | None = None
        self.subject: str | None = None
        self.target: str | None = None

    @property
    def request_id(self) -> str:
        if self._request_id is None:  # only made when logged or returned
            self._request_id = os.urandom(8).hex()
        return self._request_id

    def saw(self, verified: VerifiedToken) -> None:
        self.subject = verified.subject


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, reason: str) -> NoReturn:
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returns only by raising")


class AuthServicer(authsvc_pb2_grpc.AuthServiceServicer):  # type: ignore[misc]
    """``authsvc.v1.AuthService``: VerifyToken, GetUser, SetRole."""

    def __init__(
        self,
        store: UserStore,
        verifier: TokenVerifier,
        clerk: ClerkBackend | None,
        users: UserReader | None = None,
    ) -> None:
        self._store = store
        self._users: UserReader = users or store  # VerifyToken's hot-path reads
        self._responses = _ResponseMemo()
        self._verifier = verifier
        self._roles = RoleAdmin(store, verifier, clerk)

    async def VerifyToken(
        self, request: authsvc_pb2.VerifyTokenRequest, context: grpc.aio.ServicerContext
    ) -> authsvc_pb2.VerifyTokenResponse:
        """Verify a session token; with ``min_role`` (not ROLE_UNSPECIFIED) require that role."""

        async def handle(call: _Call) -> authsvc_pb2.VerifyTokenResponse:
            min_role = role_from_proto(request.min_role)
            if min_role is None and request.min_role != authsvc_pb2.ROLE_UNSPECIFIED:
                raise InvalidArgument(f"min_role {request.min_role} is not a known role")
            verified, user = await authorize(self._verifier, self._users, request.token, min_role, on_verified=call.saw)
            return self._responses.get(request.token, verified, user)

        return await self._serve("VerifyToken", context, handle)

    async def GetUser(self, request: authsvc_pb2.GetUserRequest, context: grpc.aio.ServicerContext) -> authsvc_pb2.User:
        """The synced user (``is_active`` false once deleted); NOT_FOUND when unknown or erased."""

        async def handle(call: _Call) -> authsvc_pb2.User:
            call.target = request.external_id[:MAX_EXTERNAL_ID]
            check_external_id(request.external_id)
            record = await self._store.get(request.external_id)
            if record is None:
                raise UserNotFound("user not found")
            return user_message(record)

        return await self._serve("GetUser", context, handle)

    async def SetRole(self, request: authsvc_pb2.SetRoleRequest, context: grpc.aio.ServicerContext) -> authsvc_pb2.User:
        """Change a user's role; the bearer token in the metadata must be an active superadmin's."""

        async def handle(call: _Call) -> authsvc_pb2.User:
            call.target = request.external_id[:MAX_EXTERNAL_ID]
            token = bearer_token(context.invocation_metadata())
            record = await self._roles.set_role(
                token, request.external_id, role_from_proto(request.role), on_verified=call.saw
            )
            return user_message(record)

        return await self._serve("SetRole", context, handle)

    async def _serve(self, rpc: str, context: grpc.aio.ServicerContext, handle: Callable[[_Call], Awaitable[T]]) -> T:
        call = _Call(rpc)
        failure: ExcInfo | None = None
        try:
            return await handle(call)
        except AuthError as exc:
            call.code, call.reason = status_of(exc)[0], exc.reason
            await _abort(context, call.code, str(exc), exc.reason)
        except asyncio.CancelledError:
            call.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            failure = (type(exc), exc, exc.__traceback__)
            call.code, call.reason = grpc.StatusCode.INTERNAL, "INTERNAL"
            await _abort(context, call.code, f"internal error (request id {call.request_id})", "INTERNAL")
        finally:
            self._log(call, context, failure)

    @staticmethod
    def _log(call: _Call, context: grpc.aio.ServicerContext, failure: ExcInfo | None) -> None:
        if failure is not None:
            level = logging.ERROR
        elif call.code is grpc.StatusCode.UNAVAILABLE:
            level = logging.WARNING
        else:
            level = logging.INFO
        if not log.isEnabledFor(level):
            return
        log.log(
            level,
            "rpc",
            exc_info=failure,
            extra=fields(
                method=call.rpc,
                request_id=call.request_id,
                peer=context.peer(),
                code=call.code.name,
                reason=call.reason,
                duration_ms=round((time.perf_counter() - call.started) * 1000, 2),
                subject=call.subject,
                target=call.target,
            ),
        )
