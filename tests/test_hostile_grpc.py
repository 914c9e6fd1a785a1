"""Hostile input to the gRPC service: issuer-signed tokens with bad claims, request bytes that do not decode.

Each test names the defect of issue 7 it pins down; all run against a real
server on loopback with a real channel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from authsvc.dev.procs import health_check
from authsvc_client.v1 import authsvc_pb2
from service.roles import Role
from service.settings import Settings
from service.users import UserStore
from tests import raw_grpc
from tests.grpc_helpers import Harness, error_info, reason_of, seed, serve
from tests.issuer import LocalIssuer

ADMIN = "user_root"


@pytest.fixture
async def harness(settings: Settings, store: UserStore, issuer: LocalIssuer) -> AsyncIterator[Harness]:
    async with serve(settings, store, issuer, ext_authz=True) as h:  # Envoy's Check too: every RPC
        await seed(store, ADMIN, Role.SUPERADMIN)
        await seed(store, "user_target", Role.STAFF)
        yield h


async def verify_fails(h: Harness, token: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=token))
    return info.value


# --- defect 1: exp/nbf/iat must be JSON numbers ---------------------------------
def _time_claims(now: int) -> dict[str, dict[str, Any]]:
    return {
        "exp-string": {"exp": str(now + 600)},
        "exp-true": {"exp": True},
        "exp-list": {"exp": [now + 600]},
        "nbf-string": {"nbf": str(now - 5)},
        "nbf-true": {"nbf": True},
        "iat-string": {"iat": str(now)},
        "iat-false": {"iat": False},
    }


@pytest.mark.parametrize("case", list(_time_claims(0)))
async def test_time_claims_that_are_not_numbers_are_malformed(harness: Harness, case: str) -> None:
    extra = _time_claims(int(time.time()))[case]
    err = await verify_fails(harness, harness.token(ADMIN, extra=extra))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(err) == "TOKEN_MALFORMED"


async def test_string_exp_bearer_cannot_change_roles(harness: Harness, store: UserStore) -> None:
    bearer = (("authorization", f"Bearer {harness.token(ADMIN, extra={'exp': str(int(time.time()) + 600)})}"),)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await harness.stub.SetRole(
            authsvc_pb2.SetRoleRequest(external_id="user_target", role=authsvc_pb2.ROLE_ADMIN), metadata=bearer
        )
    assert reason_of(info.value) == "TOKEN_MALFORMED"
    target = await store.get("user_target")
    assert target is not None and target.role is Role.STAFF


async def test_numeric_time_claims_still_verify(harness: Harness) -> None:
    now = time.time()
    token = harness.token(ADMIN, extra={"exp": now + 600.5, "iat": now - 0.5, "nbf": int(now) - 1})
    response = await harness.stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=token))
    assert response.subject == ADMIN


# --- defect 2 (token side): a lone surrogate anywhere in the claims -------------------------
@pytest.mark.parametrize(
    ("subject", "extra"),
    [
        ("user_\ud800", {}),
        (ADMIN, {"name": "x\udfff"}),
        (ADMIN, {"org": {"nested": ["ok", "\ud83d"]}}),
        (ADMIN, {"\ud800key": 1}),
    ],
    ids=["sub", "claim", "nested", "key"],
)
async def test_lone_surrogate_in_a_claim_is_malformed_not_internal(
    harness: Harness, subject: str, extra: dict[str, Any]
) -> None:
    err = await verify_fails(harness, harness.token(subject, extra=extra))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(err) == "TOKEN_MALFORMED"


# --- defect 3: request bytes that do not decode, on every RPC ----------------------------
BAD_UTF8 = bytes.fromhex("0a0361ff62")  # field 1 (string) = "a\xffb"
CORRUPT = bytes.fromhex("0a05616263")  # field 1 claims 5 bytes, 3 follow
UNARY_METHODS = [
    "/authsvc.v1.AuthService/VerifyToken",
    "/authsvc.v1.AuthService/GetUser",
    "/authsvc.v1.AuthService/SetRole",
    "/grpc.health.v1.Health/Check",
    "/envoy.service.auth.v3.Authorization/Check",
]


def assert_invalid_argument(err: grpc.aio.AioRpcError) -> None:
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    info = error_info(err)
    assert (info.domain, info.reason) == ("authsvc", "INVALID_ARGUMENT")


def assert_no_error_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize("payload", [BAD_UTF8, CORRUPT], ids=["bad-utf8", "corrupt"])
@pytest.mark.parametrize("method", UNARY_METHODS)
async def test_undecodable_unary_request_is_invalid_argument(
    harness: Harness, caplog: pytest.LogCaptureFixture, method: str, payload: bytes
) -> None:
    call = raw_grpc.unary(harness.channel, method)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(payload, metadata=harness.bearer(ADMIN))
    assert_invalid_argument(info.value)
    assert_no_error_logged(caplog)


@pytest.mark.parametrize("payload", [BAD_UTF8, CORRUPT], ids=["bad-utf8", "corrupt"])
async def test_undecodable_streaming_requests_are_invalid_argument(
    harness: Harness, caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    watch = raw_grpc.unary_stream(harness.channel, raw_grpc.HEALTH_WATCH)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in watch(payload):
            pass
    assert_invalid_argument(info.value)

    reflect = raw_grpc.stream_stream(harness.channel, raw_grpc.REFLECTION)

    async def requests() -> AsyncIterator[bytes]:
        yield payload

    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in reflect(requests()):
            pass
    assert_invalid_argument(info.value)
    assert_no_error_logged(caplog)


async def test_the_server_still_answers_after_undecodable_requests(harness: Harness) -> None:
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError):
            await raw_grpc.unary(harness.channel, UNARY_METHODS[0])(BAD_UTF8)
    response = await harness.stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=harness.token(ADMIN)))
    assert response.subject == ADMIN
    status = await health_check(harness.channel)(health_pb2.HealthCheckRequest(service=""))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
