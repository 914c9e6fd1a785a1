"""The Python client against a real authsvc: typed results, typed errors with their reasons, deadlines, retries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from authsvc_client import (
    AuthsvcClient,
    AuthsvcError,
    DeadlineExceeded,
    FailedPrecondition,
    Identity,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Role,
    Unauthenticated,
    Unavailable,
    User,
    richstatus,
)
from authsvc_client.v1 import authsvc_pb2, authsvc_pb2_grpc
from service.settings import Settings
from service.users import UserStore
from tests.grpc_helpers import FRONTEND, Harness, seed, serve
from tests.issuer import LocalIssuer


@pytest.fixture
async def h(settings: Settings, store: UserStore, issuer: LocalIssuer) -> AsyncIterator[Harness]:
    async with serve(settings, store, issuer) as harness:
        yield harness


@pytest.fixture
async def authsvc(h: Harness) -> AsyncIterator[AuthsvcClient]:
    async with AuthsvcClient(h.target) as client:
        yield client


async def test_verify_returns_a_typed_identity(h: Harness, authsvc: AuthsvcClient) -> None:
    await seed(h.store, "user_admin", Role.ADMIN, name="Ada Lovelace")
    identity = await authsvc.verify(h.token("user_admin", session_id="sess_1"), Role.ADMIN)
    assert isinstance(identity, Identity)
    assert (identity.subject, identity.session_id, identity.authorized_party) == ("user_admin", "sess_1", FRONTEND)
    assert identity.expires_at > datetime.now(UTC) and identity.expires_at.tzinfo is not None
    assert identity.role is Role.ADMIN and identity.claims["sub"] == "user_admin"
    assert identity.user is not None and identity.user.name == "Ada Lovelace"
    assert identity.user.email == "user_admin@example.com" and identity.user.is_active
    assert identity.user.created_at is not None and identity.user.last_login_at is None


async def test_an_unsynced_user_verifies_without_a_user(h: Harness, authsvc: AuthsvcClient) -> None:
    identity = await authsvc.verify(h.token("user_new"))
    assert identity.subject == "user_new" and identity.user is None and identity.role is None


async def test_roles_are_ordered() -> None:
    assert Role.STAFF < Role.ADMIN < Role.SUPERADMIN
    assert Role.SUPERADMIN.at_least(Role.ADMIN) and not Role.STAFF.at_least(Role.ADMIN)
    assert [Role.from_proto(n) for n in (0, 1, 2, 3, 9)] == [None, Role.STAFF, Role.ADMIN, Role.SUPERADMIN, None]


async def test_verify_errors_carry_their_reason(h: Harness, authsvc: AuthsvcClient) -> None:
    await seed(h.store, "user_staff")
    await seed(h.store, "user_banned", active=False)
    cases: list[tuple[str, Role | None, type[AuthsvcError], str]] = [
        ("", None, Unauthenticated, "TOKEN_MISSING"),
        ("not-a-jwt", None, Unauthenticated, "TOKEN_MALFORMED"),
        (h.token("user_staff", ttl_s=-60), None, Unauthenticated, "TOKEN_EXPIRED"),
        (h.token("user_staff", azp="https://evil.example"), None, Unauthenticated, "TOKEN_INVALID_AZP"),
        (h.token("user_staff"), Role.ADMIN, PermissionDenied, "ROLE_TOO_LOW"),
        (h.token("user_banned"), None, PermissionDenied, "USER_INACTIVE"),
        (h.token("user_new"), Role.STAFF, PermissionDenied, "USER_NOT_SYNCED"),
    ]
    for token, min_role, kind, reason in cases:
        with pytest.raises(kind) as info:
            await authsvc.verify(token, min_role)
        assert info.value.reason == reason, (reason, info.value)
        assert info.value.message


async def test_get_user(h: Harness, authsvc: AuthsvcClient) -> None:
    await seed(h.store, "user_2", Role.STAFF, name="Grace Hopper")
    user = await authsvc.get_user("user_2")
    assert isinstance(user, User)
    assert (user.external_id, user.name, user.role, user.is_active) == ("user_2", "Grace Hopper", Role.STAFF, True)
    with pytest.raises(NotFound) as missing:
        await authsvc.get_user("user_nobody")
    assert missing.value.reason == "USER_NOT_FOUND" and missing.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(InvalidArgument) as empty:
        await authsvc.get_user("")
    assert empty.value.reason == "INVALID_ARGUMENT"


async def test_set_role_and_its_errors(h: Harness, authsvc: AuthsvcClient) -> None:
    await seed(h.store, "user_sa", Role.SUPERADMIN)
    await seed(h.store, "user_2")
    await seed(h.store, "user_gone", active=False)
    root = h.token("user_sa")
    assert (await authsvc.set_role(root, "user_2", Role.ADMIN)).role is Role.ADMIN
    with pytest.raises(PermissionDenied) as outsider:
        await authsvc.set_role(h.token("user_2"), "user_2", Role.SUPERADMIN)
    assert outsider.value.reason == "CALLER_NOT_SUPERADMIN"
    with pytest.raises(FailedPrecondition) as last:
        await authsvc.set_role(root, "user_sa", Role.STAFF)
    assert last.value.reason == "LAST_SUPERADMIN"
    with pytest.raises(FailedPrecondition) as inactive:
        await authsvc.set_role(root, "user_gone", Role.ADMIN)
    assert inactive.value.reason == "USER_INACTIVE"
    with pytest.raises(NotFound):
        await authsvc.set_role(root, "user_nobody", Role.ADMIN)
    with pytest.raises(Unauthenticated) as expired:
        await authsvc.set_role(h.token("user_sa", ttl_s=-60), "user_2", Role.STAFF)
    assert expired.value.reason == "TOKEN_EXPIRED"


async def test_jwks_down_is_unavailable_with_its_reason(settings: Settings, store: UserStore) -> None:
    async with LocalIssuer() as issuer:
        issuer.down = True
        async with serve(settings, store, issuer) as h, AuthsvcClient(h.target, attempts=2) as authsvc:
            with pytest.raises(Unavailable) as info:
                await authsvc.verify(h.token("user_1"))
            assert info.value.reason == "JWKS_UNAVAILABLE"


class Flaky(authsvc_pb2_grpc.AuthServiceServicer):
    """A real AuthService that answers UNAVAILABLE ``failures`` times per method, then OK; or sleeps."""

    def __init__(self, failures: int = 0, sleep_s: float = 0.0) -> None:
        self.failures = failures
        self.sleep_s = sleep_s
        self.calls: dict[str, int] = {}

    async def _answer(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.sleep_s:
            await asyncio.sleep(self.sleep_s)
        if self.calls[method] <= self.failures:
            details = richstatus.encode(14, "down", richstatus.ErrorInfo("DATABASE_UNAVAILABLE", "authsvc"))
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "down", trailing_metadata=((richstatus.DETAILS_KEY, details),)
            )

    async def VerifyToken(
        self, request: authsvc_pb2.VerifyTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> authsvc_pb2.VerifyTokenResponse:
        await self._answer("VerifyToken", context)
        return authsvc_pb2.VerifyTokenResponse(subject="user_1")

    async def GetUser(
        self, request: authsvc_pb2.GetUserRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> authsvc_pb2.User:
        await self._answer("GetUser", context)
        return authsvc_pb2.User(external_id=request.external_id, role=authsvc_pb2.ROLE_STAFF)

    async def SetRole(
        self, request: authsvc_pb2.SetRoleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> authsvc_pb2.User:
        await self._answer("SetRole", context)
        return authsvc_pb2.User(external_id=request.external_id, role=request.role)


@contextlib.asynccontextmanager
async def flaky_server(servicer: Flaky) -> AsyncIterator[str]:
    server = grpc.aio.server()
    authsvc_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_reads_are_retried_on_unavailable_and_set_role_never() -> None:
    servicer = Flaky(failures=2)
    async with flaky_server(servicer) as target, AuthsvcClient(target) as authsvc:
        assert (await authsvc.verify("token")).subject == "user_1"
        assert (await authsvc.get_user("user_2")).external_id == "user_2"
        with pytest.raises(Unavailable) as info:
            await authsvc.set_role("token", "user_2", Role.ADMIN)
        assert info.value.reason == "DATABASE_UNAVAILABLE"
    assert servicer.calls == {"VerifyToken": 3, "GetUser": 3, "SetRole": 1}


async def test_retries_are_bounded() -> None:
    servicer = Flaky(failures=100)
    async with flaky_server(servicer) as target, AuthsvcClient(target, attempts=3) as authsvc:
        with pytest.raises(Unavailable) as info:
            await authsvc.get_user("user_2")
        assert info.value.reason == "DATABASE_UNAVAILABLE"
    assert servicer.calls == {"GetUser": 3}


async def test_every_call_has_a_deadline() -> None:
    async with flaky_server(Flaky(sleep_s=5)) as target, AuthsvcClient(target, timeout_s=0.2) as authsvc:
        with pytest.raises(DeadlineExceeded):
            await authsvc.verify("token")
        with pytest.raises(DeadlineExceeded):
            await authsvc.set_role("token", "user_2", Role.ADMIN, timeout_s=0.1)


async def test_a_server_that_is_down_is_unavailable() -> None:
    async with flaky_server(Flaky()) as target:
        pass  # started and stopped: nothing listens on the port now
    async with AuthsvcClient(target, attempts=2) as authsvc:
        with pytest.raises(Unavailable) as info:
            await authsvc.get_user("user_2")
        assert info.value.reason is None and info.value.code == grpc.StatusCode.UNAVAILABLE


def test_rich_status_round_trips_and_tolerates_garbage() -> None:
    info = richstatus.ErrorInfo("ROLE_TOO_LOW", "authsvc", {"min_role": "admin"})
    assert richstatus.decode(richstatus.encode(7, "no", info)) == info
    assert richstatus.decode(b"\xff\xff not a status") is None
    assert richstatus.from_metadata((("other", "x"),)) is None
