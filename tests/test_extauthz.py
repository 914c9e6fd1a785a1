"""Envoy's Check over gRPC against a real server: the rules of VerifyToken, in Envoy's shapes.

Also the one place that imports xds-protos and googleapis-common-protos (through
grpcio-status) together and uses both: both ship ``google.rpc`` modules.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from service.database import GRPC_DEFAULTS, durable_write_concern, make_client
from service.embedded import EmbeddedMongo
from service.roles import Role
from service.settings import Settings
from service.startup import StartupError
from service.users import UserStore
from tests.grpc_helpers import Harness, reason_of, seed, serve
from tests.issuer import LocalIssuer

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def check_request(headers: dict[str, str] | None = None, min_role: str | None = None) -> external_auth_pb2.CheckRequest:
    extensions = {"min_role": min_role} if min_role is not None else {}
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/orders", headers=headers or {})
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http), context_extensions=extensions
        )
    )


class Envoy:
    """Check as Envoy's ext_authz filter calls it."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.stub = external_auth_pb2_grpc.AuthorizationStub(h.channel)

    async def check(
        self, headers: dict[str, str] | None = None, min_role: str | None = None
    ) -> external_auth_pb2.CheckResponse:
        reply: external_auth_pb2.CheckResponse = await self.stub.Check(check_request(headers, min_role), timeout=10)
        return reply


def ok_headers(reply: external_auth_pb2.CheckResponse) -> dict[str, str]:
    assert reply.status.code == code_pb2.OK and reply.HasField("ok_response")
    assert all(option.append_action == OVERWRITE for option in reply.ok_response.headers)
    return {option.header.key: option.header.value for option in reply.ok_response.headers}


def denial(reply: external_auth_pb2.CheckResponse) -> tuple[int, int, str]:
    """(google.rpc code, HTTP status, reason) of a denied Check; the body is the JSON the contract names."""
    assert reply.HasField("denied_response")
    body = json.loads(reply.denied_response.body)
    assert set(body) == {"error", "reason"} and body["error"]
    content_types = [o.header.value for o in reply.denied_response.headers if o.header.key == "content-type"]
    assert content_types == ["application/json"]
    return reply.status.code, int(reply.denied_response.status.code), body["reason"]


@pytest.fixture
async def envoy(settings: Settings, store: UserStore, issuer: LocalIssuer) -> AsyncIterator[Envoy]:
    async with serve(settings, store, issuer, ext_authz=True) as h:
        yield Envoy(h)


async def test_header_token_is_allowed_with_identity_headers(envoy: Envoy) -> None:
    await seed(envoy.h.store, "user_admin", Role.ADMIN)
    token = envoy.h.token("user_admin", session_id="sess_9")
    headers = ok_headers(await envoy.check({"authorization": f"Bearer {token}"}))
    assert headers == {"x-authsvc-user-id": "user_admin", "x-authsvc-role": "admin", "x-authsvc-session-id": "sess_9"}


async def test_cookie_token_is_used_when_there_is_no_header(envoy: Envoy) -> None:
    await seed(envoy.h.store, "user_staff")
    cookie = f"theme=dark; __session={envoy.h.token('user_staff', session_id='sess_c')}"
    headers = ok_headers(await envoy.check({"cookie": cookie}, min_role="staff"))
    assert headers["x-authsvc-user-id"] == "user_staff" and headers["x-authsvc-role"] == "staff"


async def test_a_bad_header_never_falls_back_to_the_cookie(envoy: Envoy) -> None:
    await seed(envoy.h.store, "user_staff")
    cookie = f"__session={envoy.h.token('user_staff')}"
    for bad in ("Bearer not-a-jwt", "Basic dXNlcjpwYXNz", "Bearer "):
        reason = "TOKEN_MALFORMED"
        assert denial(await envoy.check({"authorization": bad, "cookie": cookie})) == (
            code_pb2.UNAUTHENTICATED,
            401,
            reason,
        )


async def test_raw_header_map_is_read_too(envoy: Envoy) -> None:
    """Envoy sends ``header_map`` (raw values) instead of ``headers`` when ``encode_raw_headers`` is on."""
    await seed(envoy.h.store, "user_staff")
    request = check_request()
    raw = base_pb2.HeaderValue(key="authorization", raw_value=f"Bearer {envoy.h.token('user_staff')}".encode())
    request.attributes.request.http.header_map.headers.append(raw)
    reply = await envoy.stub.Check(request, timeout=10)
    assert ok_headers(reply)["x-authsvc-user-id"] == "user_staff"


async def test_client_sent_identity_headers_are_overwritten_or_removed(envoy: Envoy) -> None:
    token = envoy.h.token("user_unsynced", session_id="sess_u")
    forged = {
        "authorization": f"Bearer {token}",
        "x-authsvc-user-id": "user_root",
        "x-authsvc-role": "superadmin",
        "x-authsvc-tenant": "acme",
    }
    reply = await envoy.check(forged)
    # An unsynced user has no role: the forged one is removed, not kept.
    assert ok_headers(reply) == {"x-authsvc-user-id": "user_unsynced", "x-authsvc-session-id": "sess_u"}
    assert sorted(reply.ok_response.headers_to_remove) == ["x-authsvc-role", "x-authsvc-tenant"]


async def test_underscore_and_mixed_spellings_of_identity_headers_are_removed(envoy: Envoy) -> None:
    """CGI-style backends read ``x_authsvc_role`` as ``x-authsvc-role``: every spelling is removed."""
    await seed(envoy.h.store, "user_staff")
    forged = {
        "authorization": f"Bearer {envoy.h.token('user_staff', session_id='sess_s')}",
        "x_authsvc_role": "superadmin",
        "x_authsvc_user_id": "user_root",
        "x-authsvc_session-id": "sess_root",
        "X_AUTHSVC_TENANT": "acme",
        "x-authsvcx": "kept: not the prefix",
        "x_authsvc": "kept: not the prefix",
    }
    reply = await envoy.check(forged)
    assert ok_headers(reply) == {
        "x-authsvc-user-id": "user_staff",
        "x-authsvc-role": "staff",
        "x-authsvc-session-id": "sess_s",
    }
    assert sorted(reply.ok_response.headers_to_remove) == sorted(
        ["x_authsvc_role", "x_authsvc_user_id", "x-authsvc_session-id", "x_authsvc_tenant"]
    )


async def test_cookies_that_simplecookie_rejects_never_hide_the_session(envoy: Envoy) -> None:
    await seed(envoy.h.store, "user_staff")
    token = envoy.h.token("user_staff")
    cookie = f'ajs_user_traits={{"plan":"pro"}}; cart=two words; pref=caf\u00e9; p=C:\\x; ; __session={token}'
    assert ok_headers(await envoy.check({"cookie": cookie}))["x-authsvc-user-id"] == "user_staff"
    # Repeated cookie headers (HTTP/2 sends one per cookie) are one cookie list, joined with "; ".
    request = check_request()
    for value in ("theme=dark", f"__session={token}", "ajs_anonymous_id=1"):
        request.attributes.request.http.header_map.headers.append(base_pb2.HeaderValue(key="cookie", value=value))
    assert ok_headers(await envoy.stub.Check(request, timeout=10))["x-authsvc-user-id"] == "user_staff"


@pytest.mark.parametrize(
    ("has", "needs", "allowed"),
    [
        (Role.STAFF, "staff", True),
        (Role.STAFF, "admin", False),
        (Role.ADMIN, "admin", True),
        (Role.ADMIN, "superadmin", False),
        (Role.SUPERADMIN, "superadmin", True),
        (Role.SUPERADMIN, "Admin", True),
    ],
)
async def test_each_min_role(envoy: Envoy, has: Role, needs: str, allowed: bool) -> None:
    await seed(envoy.h.store, "user_x", has)
    reply = await envoy.check({"authorization": f"Bearer {envoy.h.token('user_x')}"}, min_role=needs)
    if allowed:
        assert ok_headers(reply)["x-authsvc-role"] == has.wire
    else:
        assert denial(reply) == (code_pb2.PERMISSION_DENIED, 403, "ROLE_TOO_LOW")


async def test_every_denial_has_its_status_and_reason(envoy: Envoy) -> None:
    h = envoy.h
    await seed(h.store, "user_banned", active=False)

    async def deny(headers: dict[str, str], min_role: str | None = None) -> tuple[int, int, str]:
        return denial(await envoy.check(headers, min_role))

    def bearer(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}

    counted = {"method": "Check", "reason": "TOKEN_MISSING"}
    before = REGISTRY.get_sample_value("authsvc_denials_total", counted) or 0.0
    assert await deny({}) == (code_pb2.UNAUTHENTICATED, 401, "TOKEN_MISSING")
    assert REGISTRY.get_sample_value("authsvc_denials_total", counted) == before + 1
    assert await deny({"cookie": "theme=dark"}) == (code_pb2.UNAUTHENTICATED, 401, "TOKEN_MISSING")
    assert await deny(bearer(h.token("user_1", ttl_s=-60))) == (code_pb2.UNAUTHENTICATED, 401, "TOKEN_EXPIRED")
    assert await deny(bearer(h.token("user_1", azp="https://evil.example"))) == (
        code_pb2.UNAUTHENTICATED,
        401,
        "TOKEN_INVALID_AZP",
    )
    assert await deny(bearer(h.token("user_1", issuer="https://other.example"))) == (
        code_pb2.UNAUTHENTICATED,
        401,
        "TOKEN_INVALID_ISSUER",
    )
    assert await deny(bearer(h.token("user_banned"))) == (code_pb2.PERMISSION_DENIED, 403, "USER_INACTIVE")
    assert await deny(bearer(h.token("user_new")), "staff") == (code_pb2.PERMISSION_DENIED, 403, "USER_NOT_SYNCED")


async def test_unknown_min_role_fails_the_rpc_and_never_allows(envoy: Envoy) -> None:
    await seed(envoy.h.store, "user_sa", Role.SUPERADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await envoy.check({"authorization": f"Bearer {envoy.h.token('user_sa')}"}, min_role="owner")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(info.value) == "INVALID_ARGUMENT"


async def test_a_role_change_reaches_check_within_a_second(envoy: Envoy) -> None:
    await seed(envoy.h.store, "user_admin", Role.ADMIN)
    headers = {"authorization": f"Bearer {envoy.h.token('user_admin')}"}
    for _ in range(3):  # warm the caches
        ok_headers(await envoy.check(headers, "admin"))
    await seed(envoy.h.store, "user_admin", Role.STAFF)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    while (reply := await envoy.check(headers, "admin")).HasField("ok_response"):
        assert loop.time() < deadline, "the demotion did not reach Check within 1 s"
        await asyncio.sleep(0.02)
    assert denial(reply) == (code_pb2.PERMISSION_DENIED, 403, "ROLE_TOO_LOW")


async def test_unimplemented_when_off(settings: Settings, store: UserStore, issuer: LocalIssuer) -> None:
    async with serve(settings, store, issuer) as h:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await Envoy(h).check({})
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_database_down_is_unavailable(settings: Settings, issuer: LocalIssuer, tmp_path: Path) -> None:
    mongo = EmbeddedMongo(tmp_path / "private-mongo")
    await mongo.start()
    client = make_client(mongo.uri, defaults=GRPC_DEFAULTS)  # as the gRPC server runs
    try:
        store = UserStore(client["authsvc"], write_concern=await durable_write_concern(client))
        async with serve(settings, store, issuer, ext_authz=True) as h:
            await asyncio.to_thread(mongo.stop)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await Envoy(h).check({"authorization": f"Bearer {h.token('user_never_read')}"})
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert reason_of(info.value) == "DATABASE_UNAVAILABLE"
    finally:
        await client.close()
        mongo.stop()


async def test_xds_protos_and_googleapis_common_protos_work_together() -> None:
    """xds-protos overwrites google/rpc modules that googleapis-common-protos ships: both must still work."""
    info = error_details_pb2.ErrorInfo(reason="ROLE_TOO_LOW", domain="authsvc")
    status = status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message="no")
    status.details.add().Pack(info)
    rich = rpc_status.to_status(status)  # grpcio-status, over googleapis-common-protos
    assert rich.code == grpc.StatusCode.PERMISSION_DENIED
    reply = external_auth_pb2.CheckResponse(status=status)  # Envoy's message holds the same google.rpc.Status
    again = external_auth_pb2.CheckResponse.FromString(reply.SerializeToString())
    unpacked = error_details_pb2.ErrorInfo()
    assert again.status.details[0].Unpack(unpacked) and unpacked.reason == "ROLE_TOO_LOW"


async def test_on_without_the_envoy_extra_is_one_startup_line(
    settings: Settings, store: UserStore, issuer: LocalIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "service.extauthz", None)  # as if xds-protos were not installed
    with pytest.raises(StartupError) as info:
        async with serve(settings, store, issuer, ext_authz=True):
            pass
    assert str(info.value) == "AUTHSVC_EXT_AUTHZ=on needs the Envoy stubs: pip install 'authsvc[envoy]'"
