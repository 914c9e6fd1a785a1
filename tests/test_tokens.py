"""TokenVerifier against a real local issuer (aiohttp on 127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm
from jwt.api_jws import PyJWS
from jwt.exceptions import DecodeError

from authsvc.dev.issuer import DevIssuer, jwks_routes
from service import errors
from service.settings import Settings
from service.tokens import MAX_TOKEN_BYTES, SegmentDecoder, TokenVerifier
from tests.issuer import LocalIssuer

PARTY = "http://localhost:3000"
MakeVerifier = Callable[..., Awaitable[TokenVerifier]]


@pytest.fixture
async def make_verifier() -> AsyncIterator[MakeVerifier]:
    started: list[TokenVerifier] = []

    async def make(settings: Settings, **kw: Any) -> TokenVerifier:
        verifier = TokenVerifier(settings, **kw)
        started.append(verifier)
        await verifier.start()
        return verifier

    yield make
    for verifier in started:
        await verifier.close()


@pytest.fixture
async def verifier(issuer: LocalIssuer, make_verifier: MakeVerifier) -> TokenVerifier:
    return await make_verifier(settings_for(issuer))


def settings_for(issuer: LocalIssuer, **kw: Any) -> Settings:
    kw.setdefault("authorized_parties", (PARTY,))
    return Settings(frontend_api_url=issuer.url, **kw)


async def rejects(verifier: TokenVerifier, token: str, error: type[errors.AuthError], reason: str) -> None:
    """``verify(token)`` raises exactly ``error`` with ``reason``, and its message holds no token part."""
    with pytest.raises(error) as info:
        await verifier.verify(token)
    assert type(info.value) is error
    assert info.value.reason == reason
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in str(info.value)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hand_token(header: dict[str, Any], claims: dict[str, Any], hs256_key: bytes | None) -> str:
    """A JWT built without pyjwt, which refuses to make these."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b"" if hs256_key is None else hmac.new(hs256_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def good_claims(issuer: LocalIssuer) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "user_1", "sid": "sess_1", "azp": PARTY, "iss": issuer.url, "iat": now, "exp": now + 60}


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- the happy path ------------------------------------------------------------
async def test_valid_token_yields_identity(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    now = int(time.time())
    token = issuer.mint("user_2abc", session_id="sess_9", now=now, ttl_s=60, extra={"org": "o_1"})
    result = await verifier.verify(token)
    assert result.subject == "user_2abc"
    assert result.session_id == "sess_9"
    assert result.authorized_party == PARTY
    assert result.expires_at == datetime.fromtimestamp(now + 60, tz=UTC)
    assert result.expires_at.tzinfo is UTC
    assert result.claims["org"] == "o_1"
    assert result.claims["iss"] == issuer.url
    assert verifier.fetch_count == 1


async def test_repeated_token_gives_same_result(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("user_1")
    assert await verifier.verify(token) == await verifier.verify(token)


async def test_cached_token_still_expires(issuer: LocalIssuer, make_verifier: MakeVerifier) -> None:
    verifier = await make_verifier(settings_for(issuer, clock_skew_s=0))
    token = issuer.mint("user_1", ttl_s=2)
    result = await verifier.verify(token)
    await verifier.verify(token)
    await asyncio.sleep(max(0.0, result.expires_at.timestamp() - time.time()) + 0.05)
    await rejects(verifier, token, errors.TokenExpired, "TOKEN_EXPIRED")


async def test_missing_azp_accepted_when_parties_unset(issuer: LocalIssuer, make_verifier: MakeVerifier) -> None:
    verifier = await make_verifier(settings_for(issuer, authorized_parties=()))
    result = await verifier.verify(issuer.mint("user_1", azp=None, session_id=None))
    assert result.authorized_party == ""


async def test_token_without_kid_uses_the_only_key(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    result = await verifier.verify(issuer.mint("user_1", headers={"kid": None}))
    assert result.subject == "user_1"


async def test_token_without_kid_is_ambiguous_with_two_keys(issuer: LocalIssuer, make_verifier: MakeVerifier) -> None:
    issuer.rotate()
    verifier = await make_verifier(settings_for(issuer))
    await rejects(verifier, issuer.mint("user_1", headers={"kid": None}), errors.KeyNotFound, "KEY_NOT_FOUND")


# --- claims --------------------------------------------------------------------
async def test_expired_token_is_rejected(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("user_1", now=time.time() - 120)
    await rejects(verifier, token, errors.TokenExpired, "TOKEN_EXPIRED")


async def test_nbf_beyond_leeway_is_not_yet_valid(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("user_1", extra={"nbf": int(time.time()) + 30})
    await rejects(verifier, token, errors.TokenNotYetValid, "TOKEN_NOT_YET_VALID")


async def test_iat_beyond_leeway_is_not_yet_valid(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("user_1", extra={"iat": int(time.time()) + 30})
    await rejects(verifier, token, errors.TokenNotYetValid, "TOKEN_NOT_YET_VALID")


async def test_leeway_accepts_recent_expiry(issuer: LocalIssuer, make_verifier: MakeVerifier) -> None:
    token = issuer.mint("user_1", now=time.time() - 63, ttl_s=60)  # expired about 3 s ago
    lenient = await make_verifier(settings_for(issuer, clock_skew_s=5))
    assert (await lenient.verify(token)).subject == "user_1"
    strict = await make_verifier(settings_for(issuer, clock_skew_s=0))
    await rejects(strict, token, errors.TokenExpired, "TOKEN_EXPIRED")


async def test_wrong_issuer_is_rejected(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("user_1", issuer="https://evil.example")
    await rejects(verifier, token, errors.TokenInvalidIssuer, "TOKEN_INVALID_ISSUER")


async def test_missing_issuer_is_rejected(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("user_1", extra={"iss": None})
    await rejects(verifier, token, errors.TokenInvalidIssuer, "TOKEN_INVALID_ISSUER")


async def test_wrong_azp_is_rejected(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("user_1", azp="https://evil.example")
    await rejects(verifier, token, errors.TokenInvalidAzp, "TOKEN_INVALID_AZP")


async def test_missing_azp_rejected_when_parties_set(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    await rejects(verifier, issuer.mint("user_1", azp=None), errors.TokenInvalidAzp, "TOKEN_INVALID_AZP")


async def test_non_string_azp_is_rejected(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("user_1", extra={"azp": [PARTY]})
    await rejects(verifier, token, errors.TokenInvalidAzp, "TOKEN_INVALID_AZP")


@pytest.mark.parametrize("audience", ["other", None])
async def test_wrong_or_missing_audience_is_rejected(
    issuer: LocalIssuer, make_verifier: MakeVerifier, audience: str | None
) -> None:
    verifier = await make_verifier(settings_for(issuer, jwt_audience="convex"))
    assert (await verifier.verify(issuer.mint("user_1", audience="convex"))).claims["aud"] == "convex"
    token = issuer.mint("user_1", audience=audience)
    await rejects(verifier, token, errors.TokenInvalidAudience, "TOKEN_INVALID_AUDIENCE")


async def test_audience_ignored_when_unset(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    assert (await verifier.verify(issuer.mint("user_1", audience="convex"))).subject == "user_1"


@pytest.mark.parametrize("claim", ["exp", "iat", "sub"])
async def test_required_claim_missing_is_malformed(issuer: LocalIssuer, verifier: TokenVerifier, claim: str) -> None:
    token = issuer.mint("user_1", extra={claim: None})
    await rejects(verifier, token, errors.TokenMalformed, "TOKEN_MALFORMED")


async def test_empty_subject_is_malformed(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    await rejects(verifier, issuer.mint(""), errors.TokenMalformed, "TOKEN_MALFORMED")


# --- signature, algorithm, shape ---------------------------------------------
async def test_tampered_payload_fails_signature(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    header, _, signature = issuer.mint("user_1").split(".")
    payload = issuer.mint("user_admin").split(".")[1]
    await rejects(verifier, f"{header}.{payload}.{signature}", errors.TokenInvalidSignature, "TOKEN_INVALID_SIGNATURE")


async def test_unknown_key_is_key_not_found(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    stranger = DevIssuer.generate().mint("user_1", issuer=issuer.url)
    await rejects(verifier, stranger, errors.KeyNotFound, "KEY_NOT_FOUND")


async def test_alg_none_is_unsupported(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    token = hand_token({"alg": "none", "typ": "JWT", "kid": issuer.current.kid}, good_claims(issuer), None)
    await rejects(verifier, token, errors.TokenUnsupportedAlg, "TOKEN_UNSUPPORTED_ALG")


async def test_hs256_signed_with_public_pem_is_unsupported(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    # The classic key-confusion attack: an HMAC keyed with the published public key.
    pem = issuer.current.public_pem().encode()
    token = hand_token({"alg": "HS256", "typ": "JWT", "kid": issuer.current.kid}, good_claims(issuer), pem)
    await rejects(verifier, token, errors.TokenUnsupportedAlg, "TOKEN_UNSUPPORTED_ALG")


async def test_rs512_is_unsupported(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    token = issuer.mint("user_1", algorithm="RS512")
    await rejects(verifier, token, errors.TokenUnsupportedAlg, "TOKEN_UNSUPPORTED_ALG")


async def test_forged_alg_never_causes_a_fetch(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    token = hand_token({"alg": "none", "kid": "unknown"}, good_claims(issuer), None)
    await rejects(verifier, token, errors.TokenUnsupportedAlg, "TOKEN_UNSUPPORTED_ALG")
    assert issuer.fetches == 1


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b",
        "a.b.c",
        "e30.e30.",  # {} header: no alg
        "eyJhbGciOiJSUzI1NiJ9",  # a header alone
        "eyJhbGciOiJSUzI1NiIsImtpZCI6MX0.e30.",  # kid is not a string
        "ü.ü.ü",
        "x" * MAX_TOKEN_BYTES,
    ],
)
async def test_garbage_is_malformed(verifier: TokenVerifier, token: str) -> None:
    await rejects(verifier, token, errors.TokenMalformed, "TOKEN_MALFORMED")


async def test_empty_token_is_missing(verifier: TokenVerifier) -> None:
    await rejects(verifier, "", errors.TokenMissing, "TOKEN_MISSING")


async def test_token_over_8_kib_is_too_large(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    signed = issuer.mint("user_1", extra={"pad": "p" * MAX_TOKEN_BYTES})
    await rejects(verifier, signed, errors.TokenTooLarge, "TOKEN_TOO_LARGE")
    await rejects(verifier, "x" * (MAX_TOKEN_BYTES + 1), errors.TokenTooLarge, "TOKEN_TOO_LARGE")
    # Counted in bytes, not characters.
    await rejects(verifier, "ü" * (MAX_TOKEN_BYTES // 2 + 1), errors.TokenTooLarge, "TOKEN_TOO_LARGE")


async def test_unusable_jwks_entries_are_skipped(issuer: LocalIssuer, make_verifier: MakeVerifier) -> None:
    rs384 = DevIssuer.generate()
    enc = DevIssuer.generate()
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    issuer.extra_jwks = [
        {**rs384.jwks()["keys"][0], "alg": "RS384"},
        {**enc.jwks()["keys"][0], "use": "enc"},
        {**ec_jwk, "kid": "ec-1"},
        {"kty": "RSA", "kid": "broken", "n": "!!"},
        "not a key",  # type: ignore[list-item]
    ]
    verifier = await make_verifier(settings_for(issuer))
    assert (await verifier.verify(issuer.mint("user_1"))).subject == "user_1"
    for other in (rs384, enc):
        await rejects(verifier, other.mint("user_1", issuer=issuer.url), errors.KeyNotFound, "KEY_NOT_FOUND")


# --- the key cache --------------------------------------------------------------
async def test_rotated_key_is_accepted_after_one_fetch(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    issuer.rotate()
    assert (await verifier.verify(issuer.mint("user_1"))).subject == "user_1"
    assert issuer.fetches == 2


async def test_concurrent_unknown_kid_fetches_at_most_once(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    issuer.delay_s = 0.2
    stranger = DevIssuer.generate().mint("user_1", issuer=issuer.url)
    results = await asyncio.gather(*(verifier.verify(stranger) for _ in range(200)), return_exceptions=True)
    assert all(isinstance(r, errors.KeyNotFound) for r in results)
    assert issuer.fetches - 1 <= 1
    assert verifier.fetch_count == issuer.fetches


async def test_concurrent_rotated_kid_shares_one_fetch(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    issuer.delay_s = 0.2
    issuer.rotate()
    tokens = [issuer.mint(f"user_{i}") for i in range(200)]
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert [r.subject for r in results] == [f"user_{i}" for i in range(200)]
    assert issuer.fetches == 2


async def test_second_unknown_kid_within_interval_does_not_fetch(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    for _ in range(2):
        stranger = DevIssuer.generate().mint("user_1", issuer=issuer.url)
        await rejects(verifier, stranger, errors.KeyNotFound, "KEY_NOT_FOUND")
    assert issuer.fetches == 2  # the start, then one refetch
    issuer.rotate()  # even a genuinely new key waits for the interval (or the background refresh)
    await rejects(verifier, issuer.mint("user_1"), errors.KeyNotFound, "KEY_NOT_FOUND")
    assert issuer.fetches == 2


async def test_cached_keys_verify_while_jwks_down(issuer: LocalIssuer, make_verifier: MakeVerifier) -> None:
    verifier = await make_verifier(settings_for(issuer), refresh_interval_s=0.02, min_refetch_interval_s=0)
    issuer.down = True
    before = issuer.fetches
    await until(lambda: issuer.fetches >= before + 2)  # refreshes failed
    assert (await verifier.verify(issuer.mint("user_1"))).subject == "user_1"


async def test_jwks_down_from_start_is_unavailable(issuer: LocalIssuer, make_verifier: MakeVerifier) -> None:
    issuer.down = True
    verifier = await make_verifier(settings_for(issuer))
    await rejects(verifier, issuer.mint("user_1"), errors.JwksUnavailable, "JWKS_UNAVAILABLE")
    issuer.down = False
    # The refetch interval protects the issuer from a retry on every call.
    await rejects(verifier, issuer.mint("user_1"), errors.JwksUnavailable, "JWKS_UNAVAILABLE")
    assert issuer.fetches == 2


async def test_background_refresh_picks_up_rotated_key(issuer: LocalIssuer, make_verifier: MakeVerifier) -> None:
    verifier = await make_verifier(settings_for(issuer), refresh_interval_s=0.05, min_refetch_interval_s=3600)
    stranger = DevIssuer.generate().mint("user_1", issuer=issuer.url)
    await rejects(verifier, stranger, errors.KeyNotFound, "KEY_NOT_FOUND")  # spends the refetch
    issuer.rotate(drop_old=True)
    before = issuer.fetches
    # The loop is sequential: once fetch n+1 arrives, fetch n (after the rotation) is installed.
    await until(lambda: issuer.fetches >= before + 2)
    assert (await verifier.verify(issuer.mint("user_1"))).subject == "user_1"


async def test_dropped_key_forgets_cached_results(issuer: LocalIssuer, verifier: TokenVerifier) -> None:
    old = issuer.mint("user_1")
    await verifier.verify(old)
    issuer.rotate(drop_old=True)
    await verifier.verify(issuer.mint("user_1"))  # refetch: the old key is gone
    await rejects(verifier, old, errors.KeyNotFound, "KEY_NOT_FOUND")


# --- CLERK_JWT_KEY ------------------------------------------------------------
async def test_jwt_key_verifies_without_any_fetch(issuer: LocalIssuer, make_verifier: MakeVerifier) -> None:
    verifier = await make_verifier(settings_for(issuer, jwt_key=issuer.current.public_pem()))
    assert (await verifier.verify(issuer.mint("user_1"))).subject == "user_1"
    await rejects(
        verifier,
        issuer.mint("user_1", issuer="https://evil.example"),
        errors.TokenInvalidIssuer,
        "TOKEN_INVALID_ISSUER",
    )
    stranger = DevIssuer.generate().mint("user_1", issuer=issuer.url)
    await rejects(verifier, stranger, errors.TokenInvalidSignature, "TOKEN_INVALID_SIGNATURE")
    assert verifier.fetch_count == 0
    assert issuer.requests == 0


async def test_jwt_key_alone_skips_the_issuer_check(make_verifier: MakeVerifier) -> None:
    dev = DevIssuer.generate()
    verifier = await make_verifier(Settings(jwt_key=dev.public_pem(), authorized_parties=(PARTY,)))
    assert (await verifier.verify(dev.mint("user_1", issuer="https://any.clerk.accounts.dev"))).subject == "user_1"
    assert verifier.fetch_count == 0


# --- logging --------------------------------------------------------------------
async def test_logs_never_hold_tokens(
    issuer: LocalIssuer, make_verifier: MakeVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    verifier = await make_verifier(settings_for(issuer))
    tokens = [
        issuer.mint("user_1"),
        issuer.mint("user_1", azp="https://evil.example"),
        DevIssuer.generate().mint("user_1", issuer=issuer.url),
    ]
    for token in tokens:
        try:
            await verifier.verify(token)
        except errors.TokenError:
            pass
    assert any(r.getMessage() == "jwks fetched" for r in caplog.records)
    for token in tokens:
        for part in token.split("."):
            assert part not in caplog.text
            for record in caplog.records:
                assert part not in json.dumps(getattr(record, "fields", {}), default=str)


# --- the development issuer --------------------------------------------------------
async def test_dev_issuer_key_is_created_once_and_served(tmp_path: Path, make_verifier: MakeVerifier) -> None:
    first = DevIssuer.load_or_create(tmp_path / "dev")
    again = DevIssuer.load_or_create(tmp_path / "dev")
    assert again.kid == first.kid
    assert stat.S_IMODE(os.stat(tmp_path / "dev" / "issuer-key.pem").st_mode) == 0o600
    assert os.listdir(tmp_path / "dev") == ["issuer-key.pem"]

    app = web.Application()
    app.add_routes(jwks_routes(first))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        verifier = await make_verifier(Settings(frontend_api_url=url, authorized_parties=(PARTY,)))
        assert (await verifier.verify(again.mint("user_dev", issuer=url))).subject == "user_dev"
    finally:
        await runner.cleanup()


# pyjwt's own check of a base64url segment, and the one authsvc decodes with: same answers for any bytes.
_SEGMENT_BYTES = st.one_of(
    st.binary(max_size=40),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/.! \n", max_size=40).map(
        str.encode
    ),
    st.binary(max_size=30).map(lambda b: base64.urlsafe_b64encode(b)),  # padded, canonical
)


@given(_SEGMENT_BYTES)
def test_token_segments_decode_exactly_as_pyjwt_decodes_them(segment: bytes) -> None:
    def outcome(decode: Callable[[bytes, str], bytes]) -> tuple[str, bytes | str]:
        try:
            return "ok", decode(segment, "payload")
        except DecodeError as exc:
            return "error", str(exc)

    assert outcome(SegmentDecoder._decode_base64url_segment) == outcome(PyJWS._decode_base64url_segment)


async def test_a_token_whose_segments_are_not_canonical_base64url_is_malformed(
    issuer: LocalIssuer, make_verifier: MakeVerifier
) -> None:
    verifier = await make_verifier(settings_for(issuer, jwt_key=issuer.current.public_pem()))
    token = issuer.mint("user_1", azp=PARTY)
    head, payload, signature = token.split(".")
    malformed = [
        f"{head}.{payload}.{signature[:-1]}!",  # a character outside base64url
        f"{head}.{payload}!.{signature}",
        f"{head}.{payload}===.{signature}",  # more padding than base64 has
    ]
    for bad in malformed:
        await rejects(verifier, bad, errors.TokenMalformed, "TOKEN_MALFORMED")
    assert (await verifier.verify(token)).subject == "user_1"
