"""Property tests against the running servers (hypothesis): hostile input never becomes a 5xx, UNKNOWN or INTERNAL.

``make test`` runs the ``default`` profile (tens of examples each, seconds);
``make fuzz`` runs the ``fuzz`` profile (ten times as many and more). Each test
starts its server once and feeds it every example.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from hypothesis import given
from hypothesis import strategies as st

from authsvc.dev.issuer import DevIssuer
from authsvc_client.v1 import authsvc_pb2
from service.settings import Settings
from service.users import UserStore
from tests import raw_grpc
from tests.conftest import WEBHOOK_SECRET
from tests.grpc_helpers import FRONTEND, Harness, error_info, serve
from tests.issuer import LocalIssuer
from tests.sidecar import Sender, fixture, raw_signed_headers
from webhook.main import sidecar

NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

# Text with everything a hostile sender might put in JSON: lone surrogates included.
hostile_text = (
    st.text(max_size=24)
    | st.text(st.characters(categories=["Cs", "Ll", "Nd", "Zs"]), max_size=8)  # Cs: lone surrogates
    | st.sampled_from(
        ["", " ", "user_\ud800", "\u017fuperadmin", "superadm\u0131n", "admin", "SUPERADMIN", "\x00", "a" * 300]
    )
)
json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | hostile_text
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=8,
)
USER_KEYS = [
    "id",
    "first_name",
    "last_name",
    "username",
    "email_addresses",
    "primary_email_address_id",
    "public_metadata",
    "banned",
    "locked",
    "updated_at",
    "created_at",
    "user_id",
]
EVENT_TYPES = ["user.created", "user.updated", "user.deleted", "session.created", "organizationMembership.created"]


@st.composite
def mutated_event(draw: st.DrawFn) -> dict[str, Any]:
    """A real Clerk event with a few fields replaced by arbitrary JSON (or removed)."""
    event = fixture(draw(st.sampled_from(EVENT_TYPES)))
    event["data"]["id"] = f"user_{uuid.uuid4().hex[:12]}"
    for key in draw(st.lists(st.sampled_from(USER_KEYS), max_size=3, unique=True)):
        if draw(st.booleans()):
            event["data"][key] = draw(json_value)
        else:
            event["data"].pop(key, None)
    if draw(st.integers(0, 9)) == 0:
        event["type"] = draw(json_value)
    if draw(st.integers(0, 9)) == 0:
        event["data"] = draw(json_value)
    return event


async def snapshot(store: UserStore) -> tuple[list[dict[str, Any]], int]:
    users = [doc async for doc in store.users.find({}, {"_id": 0}).sort("externalId")]
    return users, await store.events.count_documents({})


@pytest.fixture
async def sender(settings: Settings, store: UserStore) -> AsyncIterator[Sender]:
    async with sidecar(settings, store) as port, aiohttp.ClientSession() as session:
        yield Sender(session, f"http://127.0.0.1:{port}{settings.webhook_path}", WEBHOOK_SECRET)


async def post_raw(sender: Sender, body: bytes, headers: dict[str, str]) -> int:
    async with sender.session.post(sender.url, data=body, headers=headers) as response:
        await response.read()
        return response.status


# --- the sidecar ------------------------------------------------------------------------
@given(event=mutated_event())
async def test_signed_mutated_events_are_200_or_400_and_400_changes_nothing(
    sender: Sender, store: UserStore, event: dict[str, Any]
) -> None:
    before = await snapshot(store)
    body = json.dumps(event).encode()  # json.dumps escapes lone surrogates, as a JSON sender would
    status = await post_raw(sender, body, {**raw_signed_headers(body), "content-type": "application/json"})
    assert status in (200, 400)
    if status == 400:
        assert await snapshot(store) == before


@given(body=st.binary(max_size=512), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8))
async def test_signed_random_bytes_never_5xx(
    sender: Sender, store: UserStore, body: bytes, flips: list[tuple[int, int]]
) -> None:
    raw = bytearray(json.dumps(fixture("user.created")).encode() if not body else body)
    for index, value in flips:
        raw[index % len(raw)] = value
    before = await snapshot(store)
    status = await post_raw(sender, bytes(raw), raw_signed_headers(bytes(raw)))
    assert status in (200, 400)
    if status == 400:
        assert await snapshot(store) == before


@given(event=mutated_event(), tamper=st.sampled_from(["body", "secret", "signature", "timestamp", "none"]))
async def test_unsigned_events_change_nothing(
    sender: Sender, store: UserStore, event: dict[str, Any], tamper: str
) -> None:
    body = json.dumps(event).encode()
    headers = raw_signed_headers(body, secret="whsec_" + "Zm9yZ2VkLXNlY3JldC1rZXktMDEyMzQ1Njc4OQ==")
    if tamper == "body":
        headers = raw_signed_headers(body)
        body += b" "
    elif tamper == "signature":
        headers = raw_signed_headers(body)
        headers["svix-signature"] = "v1," + headers["svix-signature"][3:][::-1]
    elif tamper == "timestamp":
        headers = raw_signed_headers(body)
        headers["svix-timestamp"] = str(int(time.time()) - 3600)
    elif tamper == "none":
        headers = {}
    before = await snapshot(store)
    assert await post_raw(sender, body, headers) == 401
    assert await snapshot(store) == before


# --- tokens ------------------------------------------------------------------------------
@pytest.fixture
async def harness(settings: Settings, store: UserStore, issuer: LocalIssuer) -> AsyncIterator[Harness]:
    async with serve(settings, store, issuer, ext_authz=True) as h:  # Envoy's Check too: every RPC
        yield h


CLAIMS = ["sub", "exp", "iat", "nbf", "iss", "azp", "sid", "aud", "extra"]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _clean(value: object) -> bool:
    """Encodes as UTF-8 throughout (no lone surrogate in any key or string)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def rs256_token(issuer: DevIssuer, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A JWS signed by ``issuer``'s key, built by hand: pyjwt refuses to encode most of these headers and claims."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = issuer._private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def expected_valid(claims: dict[str, Any], headers: dict[str, Any], issuer: str, now: float) -> bool | None:
    """Whether the design says the token is valid; None where leeway, range or pyjwt's own header rules decide."""
    if "crit" in headers:
        return None
    if headers.get("alg", "RS256") != "RS256" or "kid" in headers or not _clean(claims):
        return False
    sub, exp, iat, nbf = (claims.get(k) for k in ("sub", "exp", "iat", "nbf"))
    if not isinstance(sub, str) or not sub or not isinstance(exp, int | float) or not isinstance(iat, int | float):
        return False
    if not _number(exp) or not _number(iat) or (nbf is not None and not _number(nbf)):
        return False
    if claims.get("iss") != issuer or claims.get("azp") != FRONTEND:
        return False
    times: list[float] = [exp, iat] + ([nbf] if nbf is not None else [])
    if any(abs(t - now) < 30 for t in times) or exp > 2**40:
        return None  # within the leeway of a moving clock, or past datetime's range
    return bool(exp > now and iat < now and (nbf is None or nbf < now))


@given(
    changes=st.dictionaries(st.sampled_from(CLAIMS), json_value, max_size=3),
    headers=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "x5u"]), json_value, max_size=2),
)
async def test_issuer_signed_tokens_with_random_claims(
    harness: Harness, changes: dict[str, Any], headers: dict[str, Any]
) -> None:
    now = time.time()
    claims: dict[str, Any] = {
        "sub": "user_fuzz",
        "sid": "sess_1",
        "iss": harness.issuer.url,
        "azp": FRONTEND,
        "iat": int(now) - 60,
        "nbf": int(now) - 60,
        "exp": int(now) + 600,
    }
    claims.update(changes)
    claims = {k: v for k, v in claims.items() if v is not None}  # None: the claim is left out
    header: dict[str, Any] = {"alg": "RS256", "typ": "JWT"}
    header.update(headers)
    header = {k: v for k, v in header.items() if v is not None}
    token = rs256_token(harness.issuer.current, header, claims)
    valid: bool | None = False if "alg" not in header else expected_valid(claims, header, harness.issuer.url, now)
    try:
        response = await harness.stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=token), timeout=10)
    except grpc.aio.AioRpcError as err:
        assert err.code() not in NEVER, err.details()
        assert error_info(err).domain == "authsvc"
        assert valid is not True, (err.code(), err.details(), claims, headers)
    else:
        assert valid is not False, (claims, headers)
        assert response.subject == claims["sub"]


# --- raw request bytes on every RPC -------------------------------------------------------
UNARY = [
    "/authsvc.v1.AuthService/VerifyToken",
    "/authsvc.v1.AuthService/GetUser",
    "/authsvc.v1.AuthService/SetRole",
    "/grpc.health.v1.Health/Check",
    "/envoy.service.auth.v3.Authorization/Check",
]


@given(method=st.sampled_from(UNARY), payload=st.binary(max_size=256))
async def test_random_request_bytes_never_unknown_or_internal(harness: Harness, method: str, payload: bytes) -> None:
    try:
        await raw_grpc.unary(harness.channel, method)(payload, metadata=harness.bearer("user_fuzz"), timeout=10)
    except grpc.aio.AioRpcError as err:
        assert err.code() not in NEVER, (method, payload, err.details())
        if err.code() is grpc.StatusCode.INVALID_ARGUMENT:
            assert error_info(err).domain == "authsvc"


@given(payload=st.binary(max_size=256))
async def test_random_streaming_request_bytes_never_unknown_or_internal(harness: Harness, payload: bytes) -> None:
    # One message per stream: after an undecodable one the server has ended the call, and a
    # client that keeps writing gets a local INTERNAL from its own core, not from the server.
    async def requests() -> AsyncIterator[bytes]:
        yield payload

    reflect = raw_grpc.stream_stream(harness.channel, raw_grpc.REFLECTION)
    try:
        async for _ in reflect(requests(), timeout=10):
            pass
    except grpc.aio.AioRpcError as err:
        assert err.code() not in NEVER, (payload, err.details())
    watch = raw_grpc.unary_stream(harness.channel, raw_grpc.HEALTH_WATCH)
    try:
        async for _ in watch(payload, timeout=0.5):
            break  # a decodable request is a watch: its first answer is enough
    except grpc.aio.AioRpcError as err:
        assert err.code() not in NEVER | {grpc.StatusCode.UNKNOWN}, (payload, err.details())
