"""The session rules over real servers: pending sessions, impersonation and step-up for SetRole.

Tokens come from the test issuer with Clerk's ``sts``, ``act`` and ``fva``
claims; every path that checks a token is asked (VerifyToken, Envoy's Check,
SetRole's caller), and the client package reads ``actor``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.protobuf import json_format
from google.rpc import code_pb2

from authsvc_client import AuthsvcClient
from authsvc_client.v1 import authsvc_pb2 as pb
from service.roles import Role
from service.settings import Settings, SettingsError, load
from service.users import UserStore
from tests.grpc_helpers import Harness, reason_of, serve
from tests.issuer import LocalIssuer
from tests.test_extauthz import check_request, denial, ok_headers

SA, STAFF, SUPPORT = "user_sa", "user_staff", "user_support"
PENDING = {"sts": "pending"}
ACTOR = {"act": {"iss": "https://dashboard.clerk.com", "sid": "sess_support", "sub": SUPPORT}}


@pytest.fixture
async def h(settings: Settings, store: UserStore, issuer: LocalIssuer) -> AsyncIterator[Harness]:
    async with serve(settings, store, issuer, ext_authz=True) as harness:
        await harness.seed(SA, Role.SUPERADMIN)
        await harness.seed(STAFF)
        yield harness


async def failure(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), reason_of(info.value)


async def check(h: Harness, headers: dict[str, str]) -> Any:
    stub = external_auth_pb2_grpc.AuthorizationStub(h.channel)
    return await stub.Check(check_request(headers), timeout=10)


async def set_role(h: Harness, token: str, target: str = STAFF, role: pb.Role.ValueType = pb.ROLE_ADMIN) -> pb.User:
    request = pb.SetRoleRequest(external_id=target, role=role)
    reply: pb.User = await h.stub.SetRole(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    return reply


async def role_of(h: Harness, external_id: str = STAFF) -> Role | None:
    user = await h.store.get(external_id)
    return None if user is None else user.role


async def rpc_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[dict[str, Any]]:
    # grpc.aio sends an abort's status before the handler's `finally` (which logs) has run.
    for _ in range(200):
        lines = [r.__dict__["fields"] for r in caplog.records if r.name == "service.servicer" and r.msg == "rpc"]
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} rpc lines, got {len(lines)}")


# --- pending sessions ------------------------------------------------------------------------
async def test_a_pending_session_is_refused_by_every_path(h: Harness) -> None:
    pending = h.token(SA, extra=PENDING)
    for min_role in (pb.ROLE_UNSPECIFIED, pb.ROLE_STAFF):
        request = pb.VerifyTokenRequest(token=pending, min_role=min_role)
        assert await failure(h.stub.VerifyToken(request)) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_PENDING")
    assert denial(await check(h, {"authorization": f"Bearer {pending}"})) == (
        code_pb2.UNAUTHENTICATED,
        401,
        "SESSION_PENDING",
    )
    assert await failure(set_role(h, pending)) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_PENDING")
    assert await role_of(h) is Role.STAFF

    # An active session, said or not, passes (and SetRole needs no fva while step-up is off).
    for claims in ({"sts": "active"}, {}):
        reply = await h.stub.VerifyToken(pb.VerifyTokenRequest(token=h.token(SA, extra=claims)))
        assert reply.subject == SA and reply.actor == ""
    await set_role(h, h.token(SA))
    assert await role_of(h) is Role.ADMIN


async def test_pending_sessions_are_accepted_when_the_setting_says_so(
    settings: Settings, store: UserStore, issuer: LocalIssuer
) -> None:
    async with serve(settings, store, issuer, accept_pending_sessions=True) as h:
        await h.seed(SA, Role.SUPERADMIN)
        await h.seed(STAFF)
        pending = h.token(SA, extra=PENDING)
        reply = await h.stub.VerifyToken(pb.VerifyTokenRequest(token=pending, min_role=pb.ROLE_SUPERADMIN))
        assert reply.subject == SA
        await set_role(h, pending)
        assert await role_of(h) is Role.ADMIN


async def test_a_session_status_that_is_not_a_string_is_malformed(h: Harness) -> None:
    for sts in (1, ["pending"], {"s": "pending"}):
        request = pb.VerifyTokenRequest(token=h.token(SA, extra={"sts": sts}))
        assert await failure(h.stub.VerifyToken(request)) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MALFORMED")


# --- impersonation -----------------------------------------------------------------------
async def test_an_impersonated_session_names_its_actor_and_may_not_set_roles(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.servicer")
    impersonated = h.token(SA, extra=ACTOR)
    reply = await h.stub.VerifyToken(pb.VerifyTokenRequest(token=impersonated, min_role=pb.ROLE_SUPERADMIN))
    assert (reply.subject, reply.actor) == (SA, SUPPORT)
    assert json_format.MessageToDict(reply.claims)["act"]["sub"] == SUPPORT

    assert await failure(set_role(h, impersonated)) == (grpc.StatusCode.PERMISSION_DENIED, "IMPERSONATION_NOT_ALLOWED")
    assert await role_of(h) is Role.STAFF

    lines = await rpc_lines(caplog, 2)
    assert [(line["method"], line["code"], line["subject"], line["actor"]) for line in lines] == [
        ("VerifyToken", "OK", SA, SUPPORT),
        ("SetRole", "PERMISSION_DENIED", SA, SUPPORT),
    ]
    assert lines[1]["reason"] == "IMPERSONATION_NOT_ALLOWED"
    await h.stub.VerifyToken(pb.VerifyTokenRequest(token=h.token(STAFF)))
    assert (await rpc_lines(caplog, 3))[2]["actor"] is None

    # Envoy: the actor travels as x-authsvc-actor, whatever the client sent.
    forged = {"authorization": f"Bearer {impersonated}", "x-authsvc-actor": "user_nobody"}
    headers = ok_headers(await check(h, forged))
    assert headers["x-authsvc-actor"] == SUPPORT and headers["x-authsvc-user-id"] == SA
    plain = await check(h, {"authorization": f"Bearer {h.token(STAFF)}", "x-authsvc-actor": "user_nobody"})
    assert "x-authsvc-actor" not in ok_headers(plain)
    assert "x-authsvc-actor" in plain.ok_response.headers_to_remove

    # The client package's Identity.
    async with AuthsvcClient(h.target) as client:
        assert (await client.verify(impersonated)).actor == SUPPORT
        assert (await client.verify(h.token(STAFF))).actor is None


async def test_an_actor_claim_without_a_subject_is_malformed(h: Harness) -> None:
    for act in ("user_support", {"iss": "https://dashboard.clerk.com"}, {"sub": 7}, {"sub": ""}, ["user_support"]):
        request = pb.VerifyTokenRequest(token=h.token(SA, extra={"act": act}))
        assert await failure(h.stub.VerifyToken(request)) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MALFORMED")


# --- step-up for SetRole ------------------------------------------------------------------
async def test_set_role_requires_a_recent_second_factor_when_configured(
    settings: Settings, store: UserStore, issuer: LocalIssuer
) -> None:
    async with serve(settings, store, issuer, setrole_max_factor_age_min=10) as h:
        await h.seed(SA, Role.SUPERADMIN)
        await h.seed(STAFF)
        await h.seed("user_admin", Role.ADMIN)
        refused = (grpc.StatusCode.PERMISSION_DENIED, "REVERIFICATION_REQUIRED")
        stale_or_malformed: list[Any] = [
            [0, 11],  # too old
            [0, -1],  # never verified
            None,  # no fva at all
            "0,0",
            [0],
            [0, 0, 0],
            [0, "5"],
            [0, 2.5],
            [0, True],
            {"0": 0, "1": 0},
        ]
        for fva in stale_or_malformed:
            token = h.token(SA, extra={"fva": fva})
            assert await failure(set_role(h, token)) == refused, fva
        assert await role_of(h) is Role.STAFF

        # Checked only once the caller is known to be a superadmin.
        admin = h.token("user_admin", extra={"fva": [0, -1]})
        assert await failure(set_role(h, admin)) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_SUPERADMIN")

        for age, role in ((10, pb.ROLE_ADMIN), (0, pb.ROLE_STAFF)):
            await set_role(h, h.token(SA, extra={"fva": [500, age]}), role=role)
        assert await role_of(h) is Role.STAFF


def test_step_up_and_pending_settings_are_validated() -> None:
    for bad in ("-1", "1.5", "ten", "10m"):
        with pytest.raises(SettingsError) as info:
            load({"AUTHSVC_SETROLE_MAX_FACTOR_AGE_MIN": bad}, dotenv=None)
        [problem] = info.value.problems
        assert problem.startswith("AUTHSVC_SETROLE_MAX_FACTOR_AGE_MIN ") and repr(bad) in problem
    with pytest.raises(SettingsError) as info:
        load({"AUTHSVC_ACCEPT_PENDING_SESSIONS": "maybe"}, dotenv=None)
    assert info.value.problems[0].startswith("AUTHSVC_ACCEPT_PENDING_SESSIONS ")

    defaults = load({}, dotenv=None)
    assert (defaults.setrole_max_factor_age_min, defaults.accept_pending_sessions) == (0, False)
    chosen = load({"AUTHSVC_SETROLE_MAX_FACTOR_AGE_MIN": "15", "AUTHSVC_ACCEPT_PENDING_SESSIONS": "true"}, dotenv=None)
    assert (chosen.setrole_max_factor_age_min, chosen.accept_pending_sessions) == (15, True)
