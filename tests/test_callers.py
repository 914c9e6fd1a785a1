"""Callers: who may call which method (``AUTHSVC_CALLERS_FILE``), ``AUTHSVC_REFLECTION``, ``authsvc_calls_total``.

The file's rules are pure (:func:`service.callers.parse_policy`); everything
else runs against a real gRPC server on loopback, with real clients: grpc
stubs, grpcurl, the client package, Envoy's Check stub, mTLS channels with
generated certificates, and a child ``authsvc grpc`` for startup refusals.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2

from authsvc.dev.procs import child_env, health_check, run
from authsvc.dev.run import callers_line
from authsvc_client import AuthsvcClient, PermissionDenied, Role, Unauthenticated
from authsvc_client.v1 import authsvc_pb2 as pb
from service.callerfile import RELOAD_S
from service.callers import METHODS, CallersFileError, parse_policy
from service.database import durable_write_concern, make_client
from service.embedded import EmbeddedMongo
from service.settings import Settings
from service.users import UserStore
from tests import raw_grpc
from tests.grpc_helpers import Harness, make_pki, reason_of, seed, serve
from tests.issuer import LocalIssuer
from tests.test_commands import AUTHSVC
from tests.test_grpcurl import grpcurl_binary
from tests.test_metrics import grew, samples

KEY_BILLING = "billing-key-7f3a9c1e5b2d4f6a8c0e"
KEY_BILLING_NEW = "billing-key-rotated-2b4d6f8a0c1e3a5c"
KEY_OPS = "ops-key-5e7a9c1b3d5f7a9c1e3b"
KEY_PORTAL = "portal-key-0c2e4a6c8e0a2c4e6a8c"
USER = "user_known"
PORTAL_SAN = "spiffe://example.org/ns/prod/sa/admin-portal"
INTRUDER_SAN = "spiffe://example.org/ns/prod/sa/intruder"

Metadata = tuple[tuple[str, str], ...]


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def caller(name: str, methods: list[str], *, key: str | None = None, san: str | None = None) -> str:
    """One ``[[caller]]`` entry of a callers file."""
    lines = ["[[caller]]", f"name = {json.dumps(name)}"]
    if key is not None:
        lines.append(f'key_sha256 = "{sha256_hex(key)}"')
    if san is not None:
        lines.append(f"tls_san = {json.dumps(san)}")
    lines.append(f"methods = {json.dumps(methods)}")
    return "\n".join(lines) + "\n\n"


def keyed(key: str) -> Metadata:
    return (("x-authsvc-key", key),)


KEYED_FILE = (
    caller("billing", ["VerifyToken", "GetUser"], key=KEY_BILLING)
    + caller("ops", ["GetUser", "ServerReflectionInfo"], key=KEY_OPS)
    + caller("portal", ["*"], key=KEY_PORTAL)
)


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """(code, ErrorInfo reason) of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), reason_of(info.value)


async def get_user(h: Harness, metadata: Metadata = ()) -> pb.User:
    reply: pb.User = await h.stub.GetUser(pb.GetUserRequest(external_id=USER), metadata=metadata, timeout=5)
    return reply


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float) -> float:
    """Seconds until ``check()`` holds; fails the test after ``within_s``."""
    began = time.monotonic()
    while not await check():
        assert time.monotonic() - began < within_s, f"not within {within_s} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def admits(h: Harness, key: str) -> bool:
    try:
        await get_user(h, keyed(key))
    except grpc.aio.AioRpcError as err:
        assert reason_of(err) == "CALLER_UNAUTHENTICATED"
        return False
    return True


# --- the file: strict, every mistake a problem ----------------------------------------
GOOD = caller("billing", ["VerifyToken"], key=KEY_BILLING)
ENTRY_WITHOUT_METHODS = f'[[caller]]\nname = "billing"\nkey_sha256 = "{sha256_hex(KEY_BILLING)}"\n'


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", r"no \[\[caller\]\] entries"),
        ("[[caller]\nname = 1", r"not TOML: .*line 1"),
        (GOOD.replace("[[caller]]", "[[callers]]"), "unknown key 'callers'"),
        (GOOD + 'colour = "red"\n', r"caller 1 \('billing'\): unknown key 'colour'"),
        (GOOD.replace(sha256_hex(KEY_BILLING), "00ff" * 15), "key_sha256 must be 64 hexadecimal digits"),
        (GOOD.replace(sha256_hex(KEY_BILLING), "zz" * 32), "key_sha256 must be 64 hexadecimal digits"),
        (GOOD.replace('"VerifyToken"', ""), "methods must not be empty"),
        (GOOD.replace('"VerifyToken"', '"Verify"'), "unknown method 'Verify'"),
        (GOOD.replace('"VerifyToken"', '"/authsvc.v1.AuthService/GetUser"'), "unknown method"),
        (GOOD.replace('["VerifyToken"]', '"VerifyToken"'), "methods must be a list"),
        (GOOD.replace('name = "billing"', 'name = ""'), "name must be"),
        (GOOD.replace('name = "billing"\n', ""), r"caller 1: name is required"),
        (ENTRY_WITHOUT_METHODS, "methods is required"),
        (caller("billing", ["*"]), "exactly one of key_sha256 or tls_san"),
        (caller("billing", ["*"], key=KEY_BILLING, san=PORTAL_SAN), "exactly one of key_sha256 or tls_san"),
        (GOOD + caller("other", ["GetUser"], key=KEY_BILLING), r"caller 2 \('other'\): this key_sha256 is also"),
        (GOOD + caller("billing", ["*"], san=""), "tls_san must be a URI or a DNS name"),
        (caller("mailer", ["*"], san="billing@example.org"), "tls_san must be a URI or a DNS name"),
        (caller("lab", ["*"], san="spiffe://example.org/a b"), "tls_san must be a URI or a DNS name"),
    ],
)
def test_every_mistake_in_the_file_is_a_problem(text: str, problem: str) -> None:
    with pytest.raises(CallersFileError, match=problem):
        parse_policy(text, mtls=True)


def test_every_problem_of_a_file_is_on_one_line() -> None:
    text = GOOD.replace('"VerifyToken"', '"Verify"') + caller("ops", [], key=KEY_OPS)
    with pytest.raises(CallersFileError) as info:
        parse_policy(text, mtls=True)
    assert "\n" not in str(info.value)
    assert "unknown method 'Verify'" in str(info.value) and "methods must not be empty" in str(info.value)


def test_a_certificate_name_needs_mutual_tls() -> None:
    text = caller("portal", ["*"], san=PORTAL_SAN)
    with pytest.raises(CallersFileError, match="tls_san needs AUTHSVC_TLS_CLIENT_CA"):
        parse_policy(text, mtls=False)
    assert parse_policy(text, mtls=True).by_san([PORTAL_SAN]) is not None


def test_callers_are_found_by_key_or_certificate_name_and_allowed_their_methods() -> None:
    policy = parse_policy(
        GOOD
        + caller("billing", ["VerifyToken", "GetUser"], key=KEY_BILLING_NEW).replace(
            sha256_hex(KEY_BILLING_NEW), sha256_hex(KEY_BILLING_NEW).upper()
        )
        + caller("portal", ["*"], san=PORTAL_SAN),
        mtls=True,
    )
    old, new = policy.by_key(KEY_BILLING), policy.by_key(KEY_BILLING_NEW)
    assert old is not None and new is not None and old.name == new.name == "billing"  # a rotation
    assert old.allows("VerifyToken") and not old.allows("GetUser") and new.allows("GetUser")
    portal = policy.by_san(["billing.internal", PORTAL_SAN])
    assert portal is not None and portal.name == "portal" and all(portal.allows(m) for m in METHODS)
    assert policy.by_key(KEY_PORTAL) is None and policy.by_key("") is None
    assert policy.by_key(sha256_hex(KEY_BILLING)) is None  # the digest itself is no key
    assert policy.by_san([INTRUDER_SAN]) is None


def test_the_method_names_are_every_method_the_server_can_serve() -> None:
    from envoy.service.auth.v3 import external_auth_pb2 as envoy
    from grpc_reflection.v1alpha import reflection_pb2

    services = [
        pb.DESCRIPTOR.services_by_name["AuthService"],
        envoy.DESCRIPTOR.services_by_name["Authorization"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    assert set(METHODS) == {method.name for service in services for method in service.methods}


# --- keys on a running server -------------------------------------------------------------
@pytest.fixture
async def h(settings: Settings, store: UserStore, issuer: LocalIssuer, tmp_path: Path) -> AsyncIterator[Harness]:
    path = tmp_path / "callers.toml"
    path.write_text(KEYED_FILE)
    async with serve(settings, store, issuer, callers_file=path, ext_authz=True) as harness:
        await seed(store, USER)
        yield harness


async def test_unknown_callers_are_unauthenticated_and_known_ones_kept_to_their_methods(h: Harness) -> None:
    unauthenticated = (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNAUTHENTICATED")
    assert await refused(get_user(h)) == unauthenticated
    assert await refused(get_user(h, keyed("a-guess"))) == unauthenticated
    assert await refused(get_user(h, keyed(sha256_hex(KEY_BILLING)))) == unauthenticated
    assert (await get_user(h, keyed(KEY_BILLING))).external_id == USER

    set_role = h.stub.SetRole(pb.SetRoleRequest(external_id=USER, role=pb.ROLE_ADMIN), metadata=keyed(KEY_BILLING))
    assert await refused(set_role) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED")
    # A caller allowed SetRole reaches SetRole's own rules: the bearer token comes next.
    set_role = h.stub.SetRole(pb.SetRoleRequest(external_id=USER, role=pb.ROLE_ADMIN), metadata=keyed(KEY_PORTAL))
    assert await refused(set_role) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")

    health = await health_check(h.channel)(health_pb2.HealthCheckRequest(), timeout=5)  # open to everyone
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_caller_is_checked_before_the_request_is_decoded(h: Harness) -> None:
    garbage = b"\xff\xff\xff"
    get_user_raw = raw_grpc.unary(h.channel, "/authsvc.v1.AuthService/GetUser")
    set_role_raw = raw_grpc.unary(h.channel, "/authsvc.v1.AuthService/SetRole")
    assert await refused(get_user_raw(garbage)) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNAUTHENTICATED")
    assert await refused(set_role_raw(garbage, metadata=keyed(KEY_BILLING))) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "CALLER_NOT_ALLOWED",
    )
    assert await refused(get_user_raw(garbage, metadata=keyed(KEY_BILLING))) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    reflect = raw_grpc.stream_stream(h.channel, raw_grpc.REFLECTION)
    assert await refused(reflect(iter([garbage])).read()) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "CALLER_UNAUTHENTICATED",
    )
    assert await refused(reflect(iter([garbage]), metadata=keyed(KEY_BILLING)).read()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "CALLER_NOT_ALLOWED",
    )


async def test_calls_are_counted_and_logged_by_caller(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    before = samples()
    await get_user(h, keyed(KEY_BILLING))
    await refused(get_user(h))
    await refused(h.stub.SetRole(pb.SetRoleRequest(external_id=USER), metadata=keyed(KEY_BILLING)))
    await health_check(h.channel)(health_pb2.HealthCheckRequest(), timeout=5)
    after = samples()

    calls = "authsvc_calls_total"
    assert grew(before, after, calls, caller="billing", method="GetUser", code="OK") == 1
    assert grew(before, after, calls, caller="", method="GetUser", code="UNAUTHENTICATED") == 1
    assert grew(before, after, calls, caller="billing", method="SetRole", code="PERMISSION_DENIED") == 1
    assert grew(before, after, calls) == 3  # health is nobody's call
    assert grew(before, after, "authsvc_denials_total", method="GetUser", reason="CALLER_UNAUTHENTICATED") == 1
    assert grew(before, after, "authsvc_denials_total", method="SetRole", reason="CALLER_NOT_ALLOWED") == 1

    lines = [r.__dict__["fields"] for r in caplog.records if r.getMessage() == "rpc"]
    assert [(f["method"], f["caller"], f["code"], f["reason"]) for f in lines] == [
        ("GetUser", "billing", "OK", None),
        ("GetUser", None, "UNAUTHENTICATED", "CALLER_UNAUTHENTICATED"),
        ("SetRole", "billing", "PERMISSION_DENIED", "CALLER_NOT_ALLOWED"),
    ]
    assert KEY_BILLING not in caplog.text and sha256_hex(KEY_BILLING) not in caplog.text


async def test_check_refuses_unknown_callers_with_a_denied_response(h: Harness) -> None:
    # Envoy applies failure_mode_allow to a failed RPC: a refused caller must be an answered denial.
    stub = external_auth_pb2_grpc.AuthorizationStub(h.channel)
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.headers["authorization"] = f"Bearer {h.token(USER)}"

    async def denial(metadata: Metadata) -> tuple[int, int, str]:
        reply = await stub.Check(request, metadata=metadata, timeout=5)
        body = json.loads(reply.denied_response.body) if reply.HasField("denied_response") else {}
        return reply.status.code, reply.denied_response.status.code, body.get("reason", "")

    assert await denial(()) == (grpc.StatusCode.UNAUTHENTICATED.value[0], 401, "CALLER_UNAUTHENTICATED")
    assert await denial(keyed("a-guess")) == (grpc.StatusCode.UNAUTHENTICATED.value[0], 401, "CALLER_UNAUTHENTICATED")
    assert await denial(keyed(KEY_BILLING)) == (grpc.StatusCode.PERMISSION_DENIED.value[0], 403, "CALLER_NOT_ALLOWED")
    assert await denial(keyed(KEY_PORTAL)) == (grpc.StatusCode.OK.value[0], 0, "")  # allowed: the user is known


async def test_grpcurl_sends_the_key_with_h(h: Harness) -> None:
    grpcurl = str(grpcurl_binary())
    body = json.dumps({"external_id": USER})

    code, out, err = await run(grpcurl, "-plaintext", h.target, "list", timeout_s=30)
    assert code != 0 and "Unauthenticated" in err
    code, out, err = await run(grpcurl, "-plaintext", "-H", f"x-authsvc-key: {KEY_BILLING}", h.target, "list")
    assert code != 0 and "PermissionDenied" in err  # billing may not use reflection
    code, out, err = await run(grpcurl, "-plaintext", "-H", f"x-authsvc-key: {KEY_OPS}", h.target, "list")
    assert code == 0 and "authsvc.v1.AuthService" in out.split(), err
    code, out, err = await run(
        grpcurl, "-plaintext", "-H", f"x-authsvc-key: {KEY_OPS}", "-d", body, h.target, "authsvc.v1.AuthService/GetUser"
    )
    assert code == 0 and json.loads(out)["external_id"] == USER, err


async def test_the_client_package_sends_its_key_on_every_call(h: Harness) -> None:
    async with AuthsvcClient(h.target, attempts=1) as anonymous:
        with pytest.raises(Unauthenticated) as info:
            await anonymous.get_user(USER)
        assert info.value.reason == "CALLER_UNAUTHENTICATED"
    async with AuthsvcClient(h.target, key=KEY_BILLING) as billing:
        assert (await billing.get_user(USER)).external_id == USER
        assert (await billing.verify(h.token(USER))).subject == USER
        with pytest.raises(PermissionDenied) as denied:
            await billing.set_role(h.token(USER), USER, Role.ADMIN)
        assert denied.value.reason == "CALLER_NOT_ALLOWED"
    async with AuthsvcClient(h.target, key=KEY_PORTAL) as portal:  # the key and the bearer token together
        with pytest.raises(PermissionDenied) as denied:
            await portal.set_role(h.token(USER), USER, Role.ADMIN)
        assert denied.value.reason == "CALLER_NOT_SUPERADMIN"


async def test_a_refused_caller_is_answered_without_the_database(
    settings: Settings, issuer: LocalIssuer, tmp_path: Path
) -> None:
    mongo = EmbeddedMongo(tmp_path / "private-mongo")
    await mongo.start()
    client = make_client(mongo.uri, serverSelectionTimeoutMS=500)
    path = tmp_path / "callers.toml"
    path.write_text(KEYED_FILE)
    try:
        store = UserStore(client["authsvc"], write_concern=await durable_write_concern(client))
        async with serve(settings, store, issuer, callers_file=path) as h:
            mongo.kill()
            # Had a refusal read anything, it would be UNAVAILABLE, as the last call shows.
            assert await refused(get_user(h)) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNAUTHENTICATED")
            set_role = h.stub.SetRole(pb.SetRoleRequest(external_id=USER), metadata=keyed(KEY_BILLING), timeout=5)
            assert await refused(set_role) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED")
            # The database really is gone for an admitted caller.
            assert await refused(get_user(h, keyed(KEY_BILLING))) == (
                grpc.StatusCode.UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
            )
            await mongo.start()  # back, so that the service stops without waiting for it
    finally:
        await client.close()
        mongo.kill()


# --- re-reading the file ------------------------------------------------------------------
@pytest.fixture
async def reloading(
    settings: Settings, store: UserStore, issuer: LocalIssuer, tmp_path: Path
) -> AsyncIterator[tuple[Harness, Path]]:
    path = tmp_path / "callers.toml"
    path.write_text(caller("billing", ["GetUser"], key=KEY_BILLING))
    async with serve(settings, store, issuer, callers_file=path, callers_reload_s=0.1) as harness:
        await seed(store, USER)
        yield harness, path


async def refuses(h: Harness, key: str) -> bool:
    return not await admits(h, key)


async def test_a_rotation_by_edits_in_place(reloading: tuple[Harness, Path]) -> None:
    h, path = reloading
    before = samples()
    # The new key beside the old one, both named billing; then the old one goes.
    path.write_text(
        caller("billing", ["GetUser"], key=KEY_BILLING) + caller("billing", ["GetUser"], key=KEY_BILLING_NEW)
    )
    await eventually(lambda: admits(h, KEY_BILLING_NEW), within_s=5)
    assert await admits(h, KEY_BILLING)
    assert grew(before, samples(), "authsvc_calls_total", caller="billing", method="GetUser", code="OK") >= 2
    path.write_text(caller("billing", ["GetUser"], key=KEY_BILLING_NEW))
    await eventually(lambda: refuses(h, KEY_BILLING), within_s=5)
    assert await admits(h, KEY_BILLING_NEW)


async def test_a_broken_edit_keeps_the_previous_policy_with_an_error_line(
    reloading: tuple[Harness, Path], caplog: pytest.LogCaptureFixture
) -> None:
    h, path = reloading
    caplog.set_level(logging.INFO, logger="service.callerfile")
    path.write_text(caller("billing", ["GetUser"], key=KEY_BILLING_NEW).replace('"GetUser"', '"GetUsers"'))

    def errors() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.levelno == logging.ERROR]

    async def reported() -> bool:
        return bool(errors())

    await eventually(reported, within_s=5)
    await asyncio.sleep(0.3)  # several more polls of the same broken file
    [line] = errors()
    assert str(path) in json.dumps(line.__dict__["fields"]) and "GetUsers" in json.dumps(line.__dict__["fields"])
    assert await admits(h, KEY_BILLING) and await refuses(h, KEY_BILLING_NEW)
    path.write_text(caller("billing", ["GetUser"], key=KEY_BILLING_NEW))  # fixed: applies
    await eventually(lambda: admits(h, KEY_BILLING_NEW), within_s=5)
    assert await refuses(h, KEY_BILLING)


async def test_a_kubernetes_symlink_swap_is_picked_up(
    settings: Settings, store: UserStore, issuer: LocalIssuer, tmp_path: Path
) -> None:
    # A ConfigMap/Secret volume: callers.toml -> ..data/callers.toml, ..data -> ..<timestamp>/ swapped atomically.
    volume = tmp_path / "volume"
    first, second = volume / "..2026_01_01_00_00_00.1", volume / "..2026_01_01_00_01_00.2"
    for directory, key in ((first, KEY_BILLING), (second, KEY_BILLING_NEW)):
        directory.mkdir(parents=True)
        (directory / "callers.toml").write_text(caller("billing", ["GetUser"], key=key))
    (volume / "..data").symlink_to(first.name)
    (volume / "callers.toml").symlink_to("..data/callers.toml")
    async with serve(settings, store, issuer, callers_file=volume / "callers.toml", callers_reload_s=0.1) as h:
        await seed(store, USER)
        assert await admits(h, KEY_BILLING)
        (volume / "..data_tmp").symlink_to(second.name)
        os.replace(volume / "..data_tmp", volume / "..data")
        (first / "callers.toml").unlink()
        first.rmdir()
        await eventually(lambda: admits(h, KEY_BILLING_NEW), within_s=5)
        assert await refuses(h, KEY_BILLING)


async def test_an_atomic_rename_is_picked_up_within_10_s_at_the_default_interval(
    settings: Settings, store: UserStore, issuer: LocalIssuer, tmp_path: Path
) -> None:
    assert RELOAD_S <= 10
    path = tmp_path / "callers.toml"
    path.write_text(caller("billing", ["GetUser"], key=KEY_BILLING))
    async with serve(settings, store, issuer, callers_file=path) as h:
        await seed(store, USER)
        assert await admits(h, KEY_BILLING)
        staged = tmp_path / "callers.toml.new"
        staged.write_text(caller("billing", ["GetUser"], key=KEY_BILLING_NEW))
        os.replace(staged, path)
        await eventually(lambda: admits(h, KEY_BILLING_NEW), within_s=10)
        assert await refuses(h, KEY_BILLING)


# --- mutual TLS: the client certificate's URI or DNS SAN ---------------------------------
async def test_client_certificates_are_callers_by_their_san(
    settings: Settings, store: UserStore, issuer: LocalIssuer, tmp_path: Path
) -> None:
    pki = make_pki(
        tmp_path / "pki",
        clients={
            "portal": [x509.UniformResourceIdentifier(PORTAL_SAN)],
            "billing": [x509.DNSName("billing.internal"), x509.RFC822Name("billing@example.org")],
            "intruder": [
                x509.UniformResourceIdentifier(INTRUDER_SAN),
                x509.DNSName("intruder.internal"),
                x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
            ],
        },
    )
    path = tmp_path / "callers.toml"
    path.write_text(
        caller("portal", ["*"], san=PORTAL_SAN)
        + caller("billing", ["VerifyToken"], san="billing.internal")
        + caller("lab", ["*"], san="10.0.0.7")  # a DNS name: the intruder's IP SAN of that text is no match
        + caller("ops", ["GetUser"], key=KEY_OPS)
    )
    mtls = dict(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca, callers_file=path)
    async with serve(settings.model_copy(update=mtls), store, issuer) as h:
        await seed(store, USER)

        async def as_client(stem: str, metadata: Metadata = ()) -> tuple[grpc.StatusCode, str]:
            credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes(), **pki.client(stem))
            async with grpc.aio.secure_channel(h.target, credentials) as channel:
                try:
                    await channel.unary_unary(
                        "/authsvc.v1.AuthService/GetUser",
                        request_serializer=pb.GetUserRequest.SerializeToString,
                        response_deserializer=pb.User.FromString,
                    )(pb.GetUserRequest(external_id=USER), metadata=metadata, timeout=5)
                except grpc.aio.AioRpcError as err:
                    return err.code(), reason_of(err)
                return grpc.StatusCode.OK, ""

        assert await as_client("portal") == (grpc.StatusCode.OK, "")
        assert await as_client("billing") == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED")
        assert await as_client("intruder") == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNAUTHENTICATED")
        assert await as_client("client") == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNAUTHENTICATED")  # no SAN
        assert await as_client("intruder", keyed(KEY_OPS)) == (grpc.StatusCode.OK, "")  # a key works over mTLS too


# --- no file; reflection off; a bad file at startup ---------------------------------------
async def test_without_a_callers_file_anyone_may_call_with_a_warning_at_startup(
    settings: Settings, store: UserStore, issuer: LocalIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.app")
    async with serve(settings, store, issuer) as h:
        await seed(store, USER)
        before = samples()
        assert (await get_user(h)).external_id == USER
        assert (await get_user(h, keyed("anything"))).external_id == USER
        assert grew(before, samples(), "authsvc_calls_total", caller="", method="GetUser", code="OK") == 2
    assert "AUTHSVC_CALLERS_FILE is unset: any caller may call any method" in caplog.messages


async def test_reflection_can_be_turned_off(settings: Settings, store: UserStore, issuer: LocalIssuer) -> None:
    async with serve(settings, store, issuer, reflection=False) as h:
        code, _, err = await run(str(grpcurl_binary()), "-plaintext", h.target, "list", timeout_s=30)
        assert code != 0 and "does not support the reflection API" in err
        protos = Path(__file__).resolve().parents[1] / "protos"
        await seed(store, USER)
        code, out, err = await run(
            str(grpcurl_binary()),
            *("-plaintext", "-import-path", str(protos), "-proto", "authsvc/v1/authsvc.proto"),
            *("-d", json.dumps({"external_id": USER}), h.target, "authsvc.v1.AuthService/GetUser"),
        )
        assert code == 0 and USER in out, (out, err)  # the way docs/api.md gives without reflection
        reflect = raw_grpc.stream_stream(h.channel, raw_grpc.REFLECTION)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await reflect(iter([b""])).read()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert (await health_check(h.channel)(health_pb2.HealthCheckRequest(), timeout=5)).status == 1


def test_authsvc_dev_says_when_its_grpcurl_lines_need_a_key(tmp_path: Path) -> None:
    assert "-H" not in callers_line(Settings())
    (tmp_path / "callers.toml").write_text(GOOD)
    assert "-H 'x-authsvc-key: YOUR_KEY'" in callers_line(Settings(callers_file=tmp_path / "callers.toml"))


async def test_a_bad_file_at_startup_is_one_line_among_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "callers.toml"
    path.write_text(GOOD.replace('"VerifyToken"', '"Verify"'))
    env = child_env(
        CLERK_FRONTEND_API_URL="http://127.0.0.1:9",
        AUTHSVC_CALLERS_FILE=str(path),
        AUTHSVC_REFLECTION="sometimes",
        AUTHSVC_DELETE_MODE="shred",
    )
    code, out, err = await run(AUTHSVC, "grpc", env=env, cwd=tmp_path)
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert "Traceback" not in err and all(line.startswith("authsvc: ") for line in lines)
    assert sorted(line.split()[1] for line in lines) == [
        "AUTHSVC_CALLERS_FILE",
        "AUTHSVC_DELETE_MODE",
        "AUTHSVC_REFLECTION",
    ]
    [line] = [line for line in lines if "AUTHSVC_CALLERS_FILE" in line]
    assert str(path) in line and "unknown method 'Verify'" in line
    assert not (tmp_path / ".data").exists()
