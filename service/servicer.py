"""AuthService over gRPC: each RPC is one call into :mod:`service.access` or the store.

An :class:`AuthError` becomes its status code (from :func:`status_of`), its
message and a ``google.rpc.ErrorInfo`` detail; anything else is logged with
its traceback and answered ``INTERNAL`` with a request id, never its text.
Every call writes one JSON log line (as ``AUTHSVC_LOG_RPCS`` says, see
:mod:`service.rpclog`), from the fields that the core binds with
:func:`service.logs.bind` while it runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from cachetools import LRUCache

from authsvc_client.v1 import authsvc_pb2, authsvc_pb2_grpc
from service import logs
from service.access import MAX_EXTERNAL_ID, RoleAdmin, UserReader, authorize, check_external_id
from service.calls import abort
from service.convert import bearer_token, role_from_proto, user_message, verify_response
from service.errors import AuthError, InvalidArgument, UserNotFound, status_of
from service.metrics import DENIALS
from service.rpclog import ExcInfo, RpcLog, request_id_of
from service.sessions import SessionRules
from service.tokens import TokenVerifier, VerifiedToken
from service.users import UserRecord

log = logging.getLogger(__name__)

T = TypeVar("T")
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class _ReplyMemo:
    """Serialized replies per token, reused while the verifier and the user cache return the same objects.

    Both cache their results, so a token presented again yields the identical
    ``VerifiedToken`` and ``UserRecord``; building and serializing the reply
    (claims Struct, timestamps) is then most of a call's own cost, so the bytes
    are kept and sent as they are (server.py's VerifyToken serializer passes
    bytes through). Identity, not equality, decides reuse: any new verification
    or user read builds afresh.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._entries: LRUCache[str, tuple[VerifiedToken, UserRecord | None, bytes]] = LRUCache(size)

    def get(self, token: str, verified: VerifiedToken, user: UserRecord | None) -> bytes:
        entry = self._entries.get(token)
        if entry is not None and entry[0] is verified and entry[1] is user:
            return entry[2]
        reply: bytes = verify_response(verified, user).SerializeToString()
        self._entries[token] = (verified, user, reply)
        return reply


class AuthServicer(authsvc_pb2_grpc.AuthServiceServicer):
    """``authsvc.v1.AuthService``: VerifyToken, GetUser, SetRole.

    ``users`` serves VerifyToken's hot-path reads (the store, or its cache);
    ``store`` serves GetUser (the user cache, or the store itself);
    ``roles`` applies SetRole's rules; ``sessions`` the session rules of every token check;
    ``rpc_log`` writes each call's line.
    """

    def __init__(
        self,
        store: UserReader,
        verifier: TokenVerifier,
        users: UserReader,
        roles: RoleAdmin,
        sessions: SessionRules,
        rpc_log: RpcLog | None = None,
    ) -> None:
        self._log = rpc_log or RpcLog()
        self._store = store
        self._users = users
        self._verifier = verifier
        self._roles = roles
        self._sessions = sessions
        self._replies = _ReplyMemo()

    # Bytes, not the message: server.py registers VerifyToken with a serializer that sends them as they are.
    async def VerifyToken(  # type: ignore[override]
        self, request: authsvc_pb2.VerifyTokenRequest, context: Context
    ) -> bytes:
        """Verify a session token; with ``min_role`` (not ROLE_UNSPECIFIED) require that role.

        Answers the serialized ``VerifyTokenResponse`` (see :class:`_ReplyMemo`).
        """

        async def handle() -> bytes:
            min_role = None
            if request.min_role != authsvc_pb2.ROLE_UNSPECIFIED:
                min_role = role_from_proto(request.min_role)
                if min_role is None:
                    raise InvalidArgument(f"min_role {request.min_role} is not a known role")
            verified, user = await authorize(self._verifier, self._users, self._sessions, request.token, min_role)
            return self._replies.get(request.token, verified, user)

        return await self.serve("VerifyToken", context, handle)

    async def GetUser(self, request: authsvc_pb2.GetUserRequest, context: Context) -> authsvc_pb2.User:
        """The synced user (``is_active`` false once deleted); NOT_FOUND when unknown or erased."""

        async def handle() -> authsvc_pb2.User:
            logs.bind(target=request.external_id[:MAX_EXTERNAL_ID])
            check_external_id(request.external_id)
            record = await self._store.get(request.external_id)
            if record is None:
                raise UserNotFound("user not found")
            return user_message(record)

        return await self.serve("GetUser", context, handle)

    async def SetRole(self, request: authsvc_pb2.SetRoleRequest, context: Context) -> authsvc_pb2.User:
        """Change a user's role; the bearer token in the metadata must be an active superadmin's."""

        async def handle() -> authsvc_pb2.User:
            logs.bind(target=request.external_id[:MAX_EXTERNAL_ID])
            token = bearer_token(context.invocation_metadata())
            record = await self._roles.set_role(token, request.external_id, role_from_proto(request.role))
            return user_message(record)

        return await self.serve("SetRole", context, handle)

    async def serve(self, rpc: str, context: Context, handle: Callable[[], Awaitable[T]]) -> T:
        """Run ``handle`` as RPC ``rpc``: an AuthError becomes its status and ErrorInfo; one log line per call."""
        started = time.perf_counter()
        code, reason = grpc.StatusCode.OK, None
        failure: ExcInfo | None = None
        request_id: str | None = None
        with logs.call_context() as bound:
            try:
                return await handle()
            except AuthError as exc:
                code, reason = status_of(exc)[0], exc.reason
                DENIALS.labels(rpc, exc.reason).inc()
                await abort(context, code, str(exc), exc.reason)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                failure = (type(exc), exc, exc.__traceback__)
                code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
                request_id = request_id_of(context)
                await abort(context, code, f"internal error (request id {request_id})", "INTERNAL")
            finally:
                self._log.write(
                    context,
                    rpc,
                    code,
                    reason,
                    started=started,
                    failure=failure,
                    request_id=request_id,
                    subject=bound.get("subject"),
                    actor=bound.get("actor"),
                    target=bound.get("target"),
                )
