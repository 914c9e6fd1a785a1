"""AuthService end to end: a real gRPC server, database, JWKS issuer and fake Clerk, all on loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2

from authsvc.dev.issuer import DevIssuer
from authsvc.dev.procs import health_check
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc
from service.access import RoleAdmin
from service.database import GRPC_DEFAULTS, durable_write_concern, make_client
from service.embedded import EmbeddedMongo
from service.revocations import RevokedSessions
from service.roles import Role
from service.server import GrpcBindError, start_server
from service.servicer import AuthServicer
from service.sessions import SessionRules
from service.settings import Settings
from service.tokens import TokenVerifier
from service.users import UserStore
from tests.fakeclerk import FakeClerk
from tests.grpc_helpers import (
    CLERK_SECRET,
    FRONTEND,
    Harness,
    issuer_settings,
    make_pki,
    reason_of,
    seed,
    serve,
)
from tests.issuer import LocalIssuer

SA, SA2, ADMIN, STAFF, GONE = "user_sa", "user_sa2", "user_admin", "user_staff", "user_gone"


def bare_servicer(settings: Settings, store: UserStore) -> AuthServicer:
    """A servicer over a verifier and revoked sessions that were never started (no composition root)."""
    verifier = TokenVerifier(settings)
    sessions = SessionRules(RevokedSessions(store.revoked_sessions))
    return AuthServicer(store, verifier, store, RoleAdmin(store, verifier, None, sessions), sessions)


@pytest.fixture
async def h(settings: Settings, store: UserStore, issuer: LocalIssuer, fake_clerk: FakeClerk) -> AsyncIterator[Harness]:
    async with serve(settings, store, issuer, clerk=fake_clerk) as harness:
        yield harness


async def rpc_error(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, str]:
    """(code, ErrorInfo reason, message) of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), reason_of(info.value), info.value.details() or ""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def claims_for(h: Harness, subject: str = STAFF) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": subject,
        "sid": "sess_1",
        "iss": h.issuer.url,
        "azp": FRONTEND,
        "iat": now,
        "nbf": now,
        "exp": now + 60,
    }


# --- VerifyToken ---------------------------------------------------------------
async def test_valid_token_returns_identity_user_and_claims(h: Harness) -> None:
    await h.seed(STAFF, Role.ADMIN, name="Ada Lovelace")
    token = h.token(STAFF, session_id="sess_abc", extra={"org": {"id": "org_1", "tags": ["a", 2]}})
    reply = await h.stub.VerifyToken(pb.VerifyTokenRequest(token=token))
    assert (reply.subject, reply.session_id, reply.authorized_party) == (STAFF, "sess_abc", FRONTEND)
    expires = reply.expires_at.ToDatetime(tzinfo=UTC)
    assert timedelta(seconds=50) < expires - datetime.now(UTC) <= timedelta(seconds=61)
    assert reply.HasField("user")
    assert (reply.user.external_id, reply.user.name, reply.user.email) == (
        STAFF,
        "Ada Lovelace",
        f"{STAFF}@example.com",
    )
    assert reply.user.role == pb.ROLE_ADMIN and reply.user.is_active
    assert reply.user.HasField("created_at") and reply.user.HasField("updated_at")
    assert not reply.user.HasField("last_login_at")
    assert reply.claims["sub"] == STAFF and reply.claims["iss"] == h.issuer.url
    org = json_format.MessageToDict(reply.claims)["org"]
    assert org["id"] == "org_1" and org["tags"] == ["a", 2]
    assert reply.claims["exp"] == int(expires.timestamp())


def _unknown_key(h: Harness) -> str:
    return DevIssuer.generate().mint(STAFF, issuer=h.issuer.url)


def _alg_none(h: Harness) -> str:
    return handmade({"alg": "none", "typ": "JWT"}, claims_for(h), lambda _: b"")


def _hs256_with_public_key(h: Harness) -> str:
    secret = h.issuer.current.public_pem().encode()
    header = {"alg": "HS256", "typ": "JWT", "kid": h.issuer.current.kid}
    return handmade(header, claims_for(h), lambda data: hmac.new(secret, data, hashlib.sha256).digest())


def _tampered(h: Harness) -> str:
    head, _, sig = h.token(STAFF).rpartition(".")
    other = DevIssuer.generate().mint(STAFF, issuer=h.issuer.url).rpartition(".")[2]
    assert other != sig
    return f"{head}.{other}"


TOKEN_FAILURES: dict[str, tuple[Callable[[Harness], str], str]] = {
    "expired": (lambda h: h.token(STAFF, now=time.time() - 3600), "TOKEN_EXPIRED"),
    "not yet valid": (lambda h: h.token(STAFF, now=time.time() + 3600), "TOKEN_NOT_YET_VALID"),
    "wrong issuer": (lambda h: h.token(STAFF, issuer="https://evil.example.com"), "TOKEN_INVALID_ISSUER"),
    "wrong azp": (lambda h: h.token(STAFF, azp="https://evil.example.com"), "TOKEN_INVALID_AZP"),
    "no azp": (lambda h: h.token(STAFF, azp=None), "TOKEN_INVALID_AZP"),
    "unknown key": (_unknown_key, "KEY_NOT_FOUND"),
    "alg none": (_alg_none, "TOKEN_UNSUPPORTED_ALG"),
    "HS256 with the public key": (_hs256_with_public_key, "TOKEN_UNSUPPORTED_ALG"),
    "RS512": (lambda h: h.token(STAFF, algorithm="RS512"), "TOKEN_UNSUPPORTED_ALG"),
    "bad signature": (_tampered, "TOKEN_INVALID_SIGNATURE"),
    "garbage": (lambda h: "this-is.not-a.jwt", "TOKEN_MALFORMED"),
    "over-size": (lambda h: "a" * 9000, "TOKEN_TOO_LARGE"),
    "empty": (lambda h: "", "TOKEN_MISSING"),
}


@pytest.mark.parametrize("case", list(TOKEN_FAILURES))
async def test_bad_token_is_unauthenticated_with_its_reason(h: Harness, case: str) -> None:
    await h.seed(STAFF)
    make, reason = TOKEN_FAILURES[case]
    code, got, _ = await rpc_error(h.stub.VerifyToken(pb.VerifyTokenRequest(token=make(h))))
    assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, reason)


async def test_audience_is_checked_when_configured(settings: Settings, store: UserStore, issuer: LocalIssuer) -> None:
    async with serve(settings, store, issuer, jwt_audience="convex") as h:
        ok = await h.stub.VerifyToken(pb.VerifyTokenRequest(token=h.token(STAFF, audience="convex")))
        assert ok.subject == STAFF and not ok.HasField("user")
        for token in (h.token(STAFF, audience="other"), h.token(STAFF)):
            code, reason, _ = await rpc_error(h.stub.VerifyToken(pb.VerifyTokenRequest(token=token)))
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID_AUDIENCE")


ROLES = {
    "staff": (Role.STAFF, pb.ROLE_STAFF),
    "admin": (Role.ADMIN, pb.ROLE_ADMIN),
    "superadmin": (Role.SUPERADMIN, pb.ROLE_SUPERADMIN),
}


@pytest.mark.parametrize("has", list(ROLES))
@pytest.mark.parametrize("needs", list(ROLES))
async def test_min_role_allows_equal_or_higher_and_denies_lower(h: Harness, has: str, needs: str) -> None:
    role, _ = ROLES[has]
    required, wire = ROLES[needs]
    await h.seed(STAFF, role)
    call = h.stub.VerifyToken(pb.VerifyTokenRequest(token=h.token(STAFF), min_role=wire))
    if role >= required:
        assert (await call).user.role == ROLES[has][1]
    else:
        code, reason, _ = await rpc_error(call)
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_TOO_LOW")


async def test_inactive_user_is_denied_with_or_without_min_role(h: Harness) -> None:
    await h.seed(STAFF, Role.SUPERADMIN, active=False)
    for wire in (pb.ROLE_UNSPECIFIED, pb.ROLE_STAFF):
        code, reason, _ = await rpc_error(
            h.stub.VerifyToken(pb.VerifyTokenRequest(token=h.token(STAFF), min_role=wire))
        )
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "USER_INACTIVE")


async def test_soft_deleted_user_is_denied(h: Harness) -> None:
    await h.seed(STAFF)
    await h.store.delete(STAFF)
    code, reason, _ = await rpc_error(h.stub.VerifyToken(pb.VerifyTokenRequest(token=h.token(STAFF))))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "USER_INACTIVE")


async def test_unsynced_user_passes_without_min_role_and_is_denied_with_one(h: Harness) -> None:
    reply = await h.stub.VerifyToken(pb.VerifyTokenRequest(token=h.token("user_new")))
    assert reply.subject == "user_new" and not reply.HasField("user")
    code, reason, _ = await rpc_error(
        h.stub.VerifyToken(pb.VerifyTokenRequest(token=h.token("user_new"), min_role=pb.ROLE_STAFF))
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "USER_NOT_SYNCED")


async def test_unknown_min_role_is_invalid_argument(h: Harness) -> None:
    code, reason, _ = await rpc_error(h.stub.VerifyToken(pb.VerifyTokenRequest(token=h.token(STAFF), min_role=9)))  # type: ignore[arg-type]
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_jwks_down_with_nothing_cached_is_unavailable(
    settings: Settings, store: UserStore, issuer: LocalIssuer
) -> None:
    issuer.down = True
    async with serve(settings, store, issuer) as h:
        code, reason, _ = await rpc_error(h.stub.VerifyToken(pb.VerifyTokenRequest(token=h.token(STAFF))))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "JWKS_UNAVAILABLE")


async def test_unexpected_exception_is_internal_with_a_request_id_and_no_detail(
    settings: Settings, store: UserStore, issuer: LocalIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    # A verifier that was never started raises a RuntimeError (a programming
    # error, not an AuthError) when it has to fetch keys.
    unstarted = issuer_settings(settings, issuer)
    server = await start_server(unstarted, bare_servicer(unstarted, store), store.ping)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = authsvc_pb2_grpc.AuthServiceStub(channel)
            code, reason, message = await rpc_error(stub.VerifyToken(pb.VerifyTokenRequest(token=issuer.mint(STAFF))))
    finally:
        await server.stop(grace_s=0)
    assert (code, reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert message.startswith("internal error (request id ") and "start()" not in message
    request_id = message.removeprefix("internal error (request id ").rstrip(")")
    [line] = [r for r in caplog.records if r.getMessage() == "rpc" and r.__dict__["fields"]["request_id"] == request_id]
    assert line.exc_info is not None and line.levelno == logging.ERROR


async def test_each_call_logs_one_line_without_the_token(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    await h.seed(STAFF)
    token = h.token(STAFF)
    caplog.set_level(logging.INFO, logger="service.servicer")
    await h.stub.VerifyToken(pb.VerifyTokenRequest(token=token))
    await rpc_error(h.stub.VerifyToken(pb.VerifyTokenRequest(token=token, min_role=pb.ROLE_ADMIN)))
    # grpc.aio sends an abort's status before the handler's own `finally` (which logs) has run.
    for _ in range(100):
        lines = [r for r in caplog.records if r.name == "service.servicer"]
        if len(lines) >= 2:
            break
        await asyncio.sleep(0.02)
    assert [
        (
            r.__dict__["fields"]["method"],
            r.__dict__["fields"]["code"],
            r.__dict__["fields"]["reason"],
            r.__dict__["fields"]["subject"],
        )
        for r in lines
    ] == [
        ("VerifyToken", "OK", None, STAFF),
        ("VerifyToken", "PERMISSION_DENIED", "ROLE_TOO_LOW", STAFF),
    ]
    for record in lines:
        assert record.__dict__["fields"]["peer"] and record.__dict__["fields"]["duration_ms"] >= 0
        assert token not in json.dumps(record.__dict__["fields"]) and token not in record.getMessage()


# --- GetUser -----------------------------------------------------------------------
async def test_get_user_found(h: Harness) -> None:
    await h.seed(ADMIN, Role.ADMIN, name="Grace Hopper")
    await h.store.record_login(ADMIN, datetime.now(UTC))
    user = await h.stub.GetUser(pb.GetUserRequest(external_id=ADMIN))
    assert (user.external_id, user.name, user.role, user.is_active) == (
        ADMIN,
        "Grace Hopper",
        pb.ROLE_ADMIN,
        True,
    )
    assert user.HasField("last_login_at")


async def test_get_user_unknown_is_not_found(h: Harness) -> None:
    code, reason, _ = await rpc_error(h.stub.GetUser(pb.GetUserRequest(external_id="user_nobody")))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


async def test_get_user_soft_deleted_is_inactive(h: Harness) -> None:
    await h.seed(STAFF)
    await h.store.delete(STAFF)
    user = await h.stub.GetUser(pb.GetUserRequest(external_id=STAFF))
    assert user.external_id == STAFF and not user.is_active and user.name == "Test User"


async def test_get_user_hard_deleted_is_not_found(settings: Settings, issuer: LocalIssuer, database: Any) -> None:
    hard = UserStore(database.db, write_concern=database.write_concern, delete_mode="hard")
    await hard.ensure_indexes()
    await seed(hard, STAFF)
    await hard.delete(STAFF)
    async with serve(settings, hard, issuer, delete_mode="hard") as h:
        code, reason, _ = await rpc_error(h.stub.GetUser(pb.GetUserRequest(external_id=STAFF)))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


async def test_hard_deleted_or_tombstoned_user_token_is_denied(
    settings: Settings, issuer: LocalIssuer, database: Any
) -> None:
    hard = UserStore(database.db, write_concern=database.write_concern, delete_mode="hard")
    await hard.ensure_indexes()
    await seed(hard, STAFF)
    await hard.delete(STAFF)
    await hard.delete("user_never_created")
    async with serve(settings, hard, issuer, delete_mode="hard") as h:
        for subject in (STAFF, "user_never_created"):
            code, reason, _ = await rpc_error(h.stub.VerifyToken(pb.VerifyTokenRequest(token=h.token(subject))))
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "USER_INACTIVE"), subject


async def test_get_user_empty_id_is_invalid_argument(h: Harness) -> None:
    code, reason, _ = await rpc_error(h.stub.GetUser(pb.GetUserRequest(external_id="")))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


# --- SetRole -------------------------------------------------------------------------
async def audit(store: UserStore, external_id: str) -> list[dict[str, Any]]:
    return [doc async for doc in store.role_changes.find({"externalId": external_id}, {"_id": 0, "at": 0})]


async def role_in_db(store: UserStore, external_id: str) -> Role:
    user = await store.get(external_id)
    assert user is not None
    return user.role


async def test_superadmin_sets_role_in_clerk_mongodb_and_audit(h: Harness, fake_clerk: FakeClerk) -> None:
    await h.seed(SA, Role.SUPERADMIN)
    await h.seed(STAFF)
    user = await h.stub.SetRole(pb.SetRoleRequest(external_id=STAFF, role=pb.ROLE_ADMIN), metadata=h.bearer(SA))
    assert (user.external_id, user.role) == (STAFF, pb.ROLE_ADMIN)
    assert await role_in_db(h.store, STAFF) is Role.ADMIN
    stored = await h.store.get(STAFF)
    assert stored is not None and user.updated_at.ToDatetime(tzinfo=UTC) == stored.updated_at
    assert await audit(h.store, STAFF) == [
        {"externalId": STAFF, "from": "staff", "to": "admin", "by": SA, "via": "grpc"}
    ]
    assert fake_clerk.metadata_patches == [(STAFF, {"public_metadata": {"role": "admin"}}, f"Bearer {CLERK_SECRET}")]


async def test_clerk_write_through_keeps_the_user_id_one_path_segment(h: Harness, fake_clerk: FakeClerk) -> None:
    odd = "user_a/../../v1/users/user_b?x=1"
    await h.seed(SA, Role.SUPERADMIN)
    await h.seed(odd)
    user = await h.stub.SetRole(pb.SetRoleRequest(external_id=odd, role=pb.ROLE_ADMIN), metadata=h.bearer(SA))
    assert user.role == pb.ROLE_ADMIN
    assert [(uid, body) for uid, body, _ in fake_clerk.metadata_patches] == [
        (odd, {"public_metadata": {"role": "admin"}})
    ]


async def test_bearer_scheme_is_case_insensitive(h: Harness) -> None:
    await h.seed(SA, Role.SUPERADMIN)
    await h.seed(STAFF)
    metadata = (("authorization", f"bearer {h.token(SA)}"),)
    user = await h.stub.SetRole(pb.SetRoleRequest(external_id=STAFF, role=pb.ROLE_ADMIN), metadata=metadata)
    assert user.role == pb.ROLE_ADMIN


async def test_set_role_without_clerk_secret_writes_mongodb_only(
    settings: Settings, store: UserStore, issuer: LocalIssuer
) -> None:
    await seed(store, SA, Role.SUPERADMIN)
    await seed(store, STAFF)
    async with serve(settings, store, issuer) as h:
        assert h.clerk is None
        await h.stub.SetRole(pb.SetRoleRequest(external_id=STAFF, role=pb.ROLE_SUPERADMIN), metadata=h.bearer(SA))
    assert await role_in_db(store, STAFF) is Role.SUPERADMIN
    assert [(a["to"], a["by"], a["via"]) for a in await audit(store, STAFF)] == [("superadmin", SA, "grpc")]


async def assert_unchanged(h: Harness, fake_clerk: FakeClerk, external_id: str, role: Role) -> None:
    if await h.store.get(external_id) is not None:
        assert await role_in_db(h.store, external_id) is role
    assert await audit(h.store, external_id) == []
    assert fake_clerk.metadata_patches == []


SET_ROLE_DENIALS: dict[str, tuple[str | None, str, int, grpc.StatusCode, str]] = {
    # name: (caller, target, role, code, reason)
    "admin caller": (ADMIN, STAFF, pb.ROLE_ADMIN, grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_SUPERADMIN"),
    "no token": (None, STAFF, pb.ROLE_ADMIN, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING"),
    "outsider, unknown target": (
        "user_outsider",
        "user_nobody",
        pb.ROLE_ADMIN,
        grpc.StatusCode.PERMISSION_DENIED,
        "CALLER_NOT_SUPERADMIN",
    ),
    "staff, unknown target": (
        STAFF,
        "user_nobody",
        pb.ROLE_UNSPECIFIED,
        grpc.StatusCode.PERMISSION_DENIED,
        "CALLER_NOT_SUPERADMIN",
    ),
    "inactive superadmin": (
        "user_sa_off",
        STAFF,
        pb.ROLE_ADMIN,
        grpc.StatusCode.PERMISSION_DENIED,
        "USER_INACTIVE",
    ),
    "role unspecified": (
        SA,
        STAFF,
        pb.ROLE_UNSPECIFIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    ),
    "unknown role number": (SA, STAFF, 7, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    "empty id": (SA, "", pb.ROLE_ADMIN, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    "unknown target": (SA, "user_nobody", pb.ROLE_ADMIN, grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND"),
    "inactive target": (SA, GONE, pb.ROLE_ADMIN, grpc.StatusCode.FAILED_PRECONDITION, "USER_INACTIVE"),
    "last superadmin demotes self": (
        SA,
        SA,
        pb.ROLE_ADMIN,
        grpc.StatusCode.FAILED_PRECONDITION,
        "LAST_SUPERADMIN",
    ),
}


@pytest.mark.parametrize("case", list(SET_ROLE_DENIALS))
async def test_set_role_denied_changes_nothing(h: Harness, fake_clerk: FakeClerk, case: str) -> None:
    caller, target, role, want_code, want_reason = SET_ROLE_DENIALS[case]
    await h.seed(SA, Role.SUPERADMIN)
    await h.seed("user_sa_off", Role.SUPERADMIN, active=False)
    await h.seed(ADMIN, Role.ADMIN)
    await h.seed(STAFF)
    await h.seed(GONE)
    await h.store.delete(GONE)
    metadata = h.bearer(caller) if caller else ()
    code, reason, _ = await rpc_error(
        h.stub.SetRole(pb.SetRoleRequest(external_id=target, role=role), metadata=metadata)  # type: ignore[arg-type]
    )
    assert (code, reason) == (want_code, want_reason)
    before = {SA: Role.SUPERADMIN, STAFF: Role.STAFF, GONE: Role.STAFF}.get(target, Role.STAFF)
    await assert_unchanged(h, fake_clerk, target, before)


async def test_non_bearer_authorization_is_malformed(h: Harness) -> None:
    await h.seed(SA, Role.SUPERADMIN)
    metadata = (("authorization", f"Basic {h.token(SA)}"),)
    code, reason, _ = await rpc_error(
        h.stub.SetRole(pb.SetRoleRequest(external_id=SA, role=pb.ROLE_ADMIN), metadata=metadata)
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MALFORMED")


CLERK_ANSWERS: dict[str, tuple[int | None, grpc.StatusCode, str, int]] = {
    # name: (status the fake answers (None: the user is not in Clerk), code, reason, PATCH attempts)
    # A caller waits on SetRole: one retry at most (ClerkBackend.for_calls), never a sync's patience.
    "5xx until retries run out": (500, grpc.StatusCode.UNAVAILABLE, "CLERK_UNAVAILABLE", 2),
    "rate limited, Retry-After 30 s": (429, grpc.StatusCode.UNAVAILABLE, "CLERK_UNAVAILABLE", 2),
    "no such user in Clerk": (None, grpc.StatusCode.FAILED_PRECONDITION, "CLERK_USER_NOT_FOUND", 1),
    "422 from Clerk": (422, grpc.StatusCode.FAILED_PRECONDITION, "CLERK_REJECTED", 1),
    "400 from Clerk": (400, grpc.StatusCode.FAILED_PRECONDITION, "CLERK_REJECTED", 1),
    "key refused": (401, grpc.StatusCode.UNAVAILABLE, "CLERK_KEY_REFUSED", 1),
}


@pytest.mark.parametrize("case", list(CLERK_ANSWERS))
async def test_clerk_write_through_failure_changes_nothing(h: Harness, fake_clerk: FakeClerk, case: str) -> None:
    status, want_code, want_reason, attempts = CLERK_ANSWERS[case]
    await h.seed(SA, Role.SUPERADMIN)
    await h.seed(STAFF)
    if status is None:
        fake_clerk.delete_user(STAFF)
    elif status == 500:
        fake_clerk.fail = True
    elif status == 401:
        fake_clerk.secret = "sk_test_rotated"
    elif status == 429:
        fake_clerk.retry_after = "30"  # honoured, the call would outlive its 10 s deadline below
        fake_clerk.answer_next = [429, 429]
    else:
        fake_clerk.answer_next = [status]
    code, reason, _ = await rpc_error(
        h.stub.SetRole(pb.SetRoleRequest(external_id=STAFF, role=pb.ROLE_ADMIN), metadata=h.bearer(SA), timeout=10)
    )
    assert (code, reason) == (want_code, want_reason)
    assert len(fake_clerk.requests("/v1/users/{id}/metadata", "PATCH")) == attempts
    assert await role_in_db(h.store, STAFF) is Role.STAFF
    assert await audit(h.store, STAFF) == []


async def test_superadmin_may_demote_another_but_then_not_the_last(h: Harness) -> None:
    await h.seed(SA, Role.SUPERADMIN)
    await h.seed(SA2, Role.SUPERADMIN)
    await h.stub.SetRole(pb.SetRoleRequest(external_id=SA2, role=pb.ROLE_STAFF), metadata=h.bearer(SA))
    assert await role_in_db(h.store, SA2) is Role.STAFF
    code, reason, _ = await rpc_error(
        h.stub.SetRole(pb.SetRoleRequest(external_id=SA, role=pb.ROLE_STAFF), metadata=h.bearer(SA))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LAST_SUPERADMIN")
    assert await role_in_db(h.store, SA) is Role.SUPERADMIN


async def test_concurrent_demotions_never_leave_no_superadmin(
    settings: Settings, store: UserStore, issuer: LocalIssuer
) -> None:
    async with serve(settings, store, issuer) as h:
        for _ in range(5):
            await seed(store, SA, Role.SUPERADMIN)
            await seed(store, SA2, Role.SUPERADMIN)
            results = await asyncio.gather(
                h.stub.SetRole(pb.SetRoleRequest(external_id=SA2, role=pb.ROLE_ADMIN), metadata=h.bearer(SA)),
                h.stub.SetRole(pb.SetRoleRequest(external_id=SA, role=pb.ROLE_ADMIN), metadata=h.bearer(SA2)),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, grpc.aio.AioRpcError):
                    assert reason_of(result) in ("LAST_SUPERADMIN", "CALLER_NOT_SUPERADMIN")
                else:
                    assert not isinstance(result, BaseException)
            assert await store.active_superadmins(limit=2), "no active superadmin left"


# --- the server --------------------------------------------------------------------
async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_check(channel)(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def test_health_follows_the_database(
    settings: Settings, issuer: LocalIssuer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mongo = EmbeddedMongo(tmp_path / "private-mongo")
    await mongo.start()
    client = make_client(mongo.uri, defaults=GRPC_DEFAULTS)  # as the gRPC server runs
    try:
        store = UserStore(client["authsvc"], write_concern=await durable_write_concern(client))
        async with serve(settings, store, issuer, health_interval_s=0.1, stale_s=1) as h:
            for name in ("", "authsvc.v1.AuthService"):
                assert await health_status(h.channel, name) == health_pb2.HealthCheckResponse.SERVING
            await asyncio.to_thread(mongo.stop)
            deadline = time.monotonic() + 20
            while await health_status(h.channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "health never reported NOT_SERVING"
                await asyncio.sleep(0.1)
            assert (
                await health_status(h.channel, "authsvc.v1.AuthService") == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            code, reason, _ = await rpc_error(h.stub.GetUser(pb.GetUserRequest(external_id=STAFF)))
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
        # Stopping while the database is down is not held up by the change stream (a SIGTERM in an outage).
        assert not [r for r in caplog.records if "did not stop" in r.getMessage()]
    finally:
        await client.close()
        mongo.stop()


async def test_address_in_use_is_a_clear_error(settings: Settings, store: UserStore, issuer: LocalIssuer) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        busy = issuer_settings(settings, issuer, grpc_addr=f"127.0.0.1:{port}")
        with pytest.raises(GrpcBindError, match=f"127.0.0.1:{port}"):
            await start_server(busy, bare_servicer(busy, store), store.ping)


async def test_tls_and_mutual_tls(settings: Settings, store: UserStore, issuer: LocalIssuer, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    ca = pki.ca.read_bytes()
    client_pair = {
        "private_key": pki.client_key.read_bytes(),
        "certificate_chain": pki.client_cert.read_bytes(),
    }
    tls = issuer_settings(settings, issuer, tls_cert=pki.server_cert, tls_key=pki.server_key)
    for server_settings, client_certs, works in [
        (tls, {}, True),
        (tls.model_copy(update=dict(tls_client_ca=pki.ca)), client_pair, True),
        (tls.model_copy(update=dict(tls_client_ca=pki.ca)), {}, False),
    ]:
        service = await start_server(server_settings, bare_servicer(server_settings, store), store.ping)
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, **client_certs)
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{service.port}", credentials) as channel:
                if works:
                    assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await health_status(channel)
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as plain:
                with pytest.raises(grpc.aio.AioRpcError):
                    await health_status(plain)
        finally:
            await service.stop(grace_s=0)


# --- the user cache behind VerifyToken ------------------------------------------------
async def denied_soon(h: Harness, request: pb.VerifyTokenRequest, timeout_s: float = 2.0) -> str:
    """Call VerifyToken until it fails; its reason. Fails the test if it still passes after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            await h.stub.VerifyToken(request)
        except grpc.aio.AioRpcError as err:
            return reason_of(err)
        await asyncio.sleep(0.02)
    raise AssertionError(f"still allowed after {timeout_s} s")


async def test_changes_from_the_sidecar_reach_verify_token_within_moments(h: Harness) -> None:
    await h.seed(ADMIN, Role.ADMIN)
    request = pb.VerifyTokenRequest(token=h.token(ADMIN), min_role=pb.ROLE_ADMIN)
    for _ in range(3):  # warm: served from the cache from now on
        assert (await h.stub.VerifyToken(request)).user.role == pb.ROLE_ADMIN
    await h.seed(ADMIN, Role.STAFF)  # the same write a user.updated makes
    assert await denied_soon(h, request) == "ROLE_TOO_LOW"
    await h.store.delete(ADMIN)
    assert await denied_soon(h, pb.VerifyTokenRequest(token=h.token(ADMIN))) == "USER_INACTIVE"


async def test_shutdown_lets_a_call_in_flight_finish_and_refuses_new_ones(
    settings: Settings, store: UserStore, issuer: LocalIssuer
) -> None:
    await seed(store, STAFF)
    async with serve(settings, store, issuer) as h:
        issuer.rotate()  # the next token's kid is unknown: its call waits on a JWKS fetch...
        issuer.delay_s = 1.0  # ...that takes a second
        in_flight = asyncio.ensure_future(h.stub.VerifyToken(pb.VerifyTokenRequest(token=issuer.mint(STAFF))))
        while issuer.fetches < 2:
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(h.service.server.stop(grace_s=5.0))
        await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await h.stub.VerifyToken(pb.VerifyTokenRequest(token=h.token(STAFF)), timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        reply = await in_flight
        assert reply.subject == STAFF and reply.user.external_id == STAFF
        await stopping
