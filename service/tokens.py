"""Session token verification: a JWKS cache and pyjwt decode pinned to RS256.

The one implementation of the token rules of the design: RS256 only, ``exp``,
``iat`` and ``sub`` required, ``exp``/``nbf``/``iat`` JSON numbers checked with
leeway, no lone surrogate in any claim, ``iss`` equal to the issuer, ``azp``
in the allowed parties, ``aud`` when set. A failed JWKS fetch is retried in
the background with a short backoff; :attr:`TokenVerifier.ready` says whether
any signing key is available (health needs one). Every
error raised is a :class:`service.errors.TokenError` or
:class:`service.errors.JwksUnavailable` whose message is safe to send.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import jwt
from cachetools import LRUCache
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.api_jws import PyJWS
from jwt.api_jwt import PyJWT
from tenacity import AsyncRetrying, retry_if_result, wait_exponential_jitter

from service import errors
from service.logs import fields
from service.metrics import JWKS_FETCHES, TOKEN_CACHE
from service.settings import Settings

log = logging.getLogger(__name__)

_TOKEN_HIT, _TOKEN_MISS = TOKEN_CACHE.labels("hit"), TOKEN_CACHE.labels("miss")

MAX_TOKEN_BYTES = 8192
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")  # one base64url segment, unpadded
RESULT_CACHE_SIZE = 10_000
ALGORITHM = "RS256"

# pyjwt error -> (our error, safe message); the first matching row wins, so
# subclasses (InvalidSignatureError < DecodeError) come first.
_PYJWT_ERRORS: tuple[tuple[type[jwt.PyJWTError], type[errors.TokenError], str], ...] = (
    (jwt.ExpiredSignatureError, errors.TokenExpired, "token expired"),
    (jwt.ImmatureSignatureError, errors.TokenNotYetValid, "token not yet valid"),
    (jwt.InvalidIssuerError, errors.TokenInvalidIssuer, "token issuer is not accepted"),
    (jwt.InvalidAudienceError, errors.TokenInvalidAudience, "token audience is not accepted"),
    (jwt.InvalidSignatureError, errors.TokenInvalidSignature, "token signature is invalid"),
    (jwt.InvalidAlgorithmError, errors.TokenUnsupportedAlg, "only RS256 tokens are accepted"),
    (jwt.DecodeError, errors.TokenMalformed, "token is malformed"),
)


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A session token that passed every check. ``claims`` is shared: do not mutate it.

    ``actor`` is ``act.sub`` of an impersonated session, else empty; ``pending``
    says the ``sts`` claim is ``pending``. What they allow is
    :mod:`service.sessions`' to decide.
    """

    subject: str
    session_id: str
    authorized_party: str
    expires_at: datetime
    claims: dict[str, Any]
    actor: str = ""
    pending: bool = False


def _unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header alone, to pick the key: pyjwt's decode then parses and checks the whole token once.

    (``jwt.get_unverified_header`` would decode every segment, doubling the
    parse cost of a first-seen token.)
    """
    head, dot, _ = token.partition(".")
    if not dot or not _SEGMENT.fullmatch(head):
        raise errors.TokenMalformed("token is malformed")
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, RecursionError, binascii.Error) as exc:
        raise errors.TokenMalformed("token is malformed") from exc
    if not isinstance(header, dict):
        raise errors.TokenMalformed("token is malformed")
    return header


def _translate(exc: jwt.PyJWTError) -> errors.TokenError:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        # A missing aud/iss is the audience/issuer check failing, not a shape problem.
        if exc.claim == "aud":
            return errors.TokenInvalidAudience("token audience is missing")
        if exc.claim == "iss":
            return errors.TokenInvalidIssuer("token issuer is missing")
        return errors.TokenMalformed(f"token lacks a required claim ({exc.claim})")
    for foreign, ours, message in _PYJWT_ERRORS:
        if isinstance(exc, foreign):
            return ours(message)
    return errors.TokenMalformed("token is malformed")


TIME_CLAIMS = ("exp", "nbf", "iat")


def _claims_problem(claims: object) -> str | None:
    """Why verified ``claims`` are malformed beyond what pyjwt checks, or None.

    RFC 7519 makes ``exp``/``nbf``/``iat`` JSON numbers; pyjwt's ``int()``
    also takes ``"1764062100"`` and ``true``. A lone surrogate (``"\\ud800"``
    in the JSON) cannot be stored or sent back, so it is refused here, where it enters.
    """
    if not isinstance(claims, dict):
        return "token claims are not a JSON object"
    for name in TIME_CLAIMS:
        value = claims.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return f"token claim {name} is not a number"
    try:
        json.dumps(claims, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError):  # lone surrogate; NaN/Infinity outside the time claims
        return "token claims are not valid Unicode"
    return None


def _actor(claims: dict[str, Any]) -> str:
    """``act.sub`` of an impersonated session (Clerk: ``act = {iss, sid, sub}``), else empty.

    An ``act`` without a usable ``sub`` is refused rather than read as "not
    impersonated": the actor must never silently disappear.
    """
    act = claims.get("act")
    if act is None:
        return ""
    sub = act.get("sub") if isinstance(act, dict) else None
    if not isinstance(sub, str) or not sub:
        raise errors.TokenMalformed("token act claim has no actor subject")
    return sub


def _status(claims: dict[str, Any]) -> str:
    """The session status (``sts``: ``active`` or ``pending``); a token without one is active."""
    sts = claims.get("sts", "active")
    if not isinstance(sts, str):
        raise errors.TokenMalformed("token sts claim is not a string")
    return sts


def _rsa_key_from_jwk(jwk: Any) -> tuple[str | None, RSAPublicKey]:
    """Parse one JWK; raise ValueError (with a loggable reason) unless it is an RS256 public key."""
    if not isinstance(jwk, dict):
        raise ValueError("not a JSON object")
    if jwk.get("kty") != "RSA":
        raise ValueError(f"kty {jwk.get('kty')!r} is not RSA")
    if jwk.get("alg", ALGORITHM) != ALGORITHM:
        raise ValueError(f"alg {jwk.get('alg')!r} is not RS256")
    if jwk.get("use", "sig") != "sig":
        raise ValueError(f"use {jwk.get('use')!r} is not sig")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    try:
        key = jwt.PyJWK(jwk, algorithm=ALGORITHM).key
    except (jwt.PyJWTError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from exc
    if not isinstance(key, RSAPublicKey):
        raise ValueError("not an RSA public key")
    if key.key_size < 2048:
        raise ValueError(f"RSA key of {key.key_size} bits is too weak")
    return kid, key


_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")


class SegmentDecoder(PyJWS):
    """pyjwt's JWS decoding, with each segment's base64url check done by one compiled regex.

    pyjwt (2.10+) tests every byte of every segment against its alphabet in a
    Python generator, a quarter of the CPU of a first-seen token. This is the
    same check, with the same errors (``tests/test_tokens.py`` compares the
    two on arbitrary bytes): at most two ``=`` of padding and only on a
    multiple of four, only base64url characters, a length that can be
    base64, and the canonical encoding of what it decodes to.
    """

    @staticmethod
    def _decode_base64url_segment(segment: bytes, name: str) -> bytes:
        stripped = segment.rstrip(b"=")
        padding = len(segment) - len(stripped)
        malformed = padding > 2 or (padding and len(segment) % 4) or len(stripped) % 4 == 1
        if malformed or not _BASE64URL.fullmatch(stripped):
            raise jwt.DecodeError(f"Invalid {name} padding")
        decoded = base64.urlsafe_b64decode(stripped + b"=" * (-len(stripped) % 4))
        if base64.urlsafe_b64encode(decoded).rstrip(b"=") != stripped:
            raise jwt.DecodeError(f"Invalid {name} padding")
        return decoded


class TokenVerifier:
    """Verifies session tokens against ``CLERK_JWT_KEY`` or a cached, refreshed JWKS."""

    def __init__(
        self,
        settings: Settings,
        *,
        refresh_interval_s: float = 300.0,
        min_refetch_interval_s: float = 10.0,
        fetch_timeout_s: float = 3.0,
    ) -> None:
        self._issuer = settings.issuer
        self._audience = settings.jwt_audience
        self._parties = frozenset(settings.authorized_parties)
        self._leeway = float(settings.clock_skew_s)
        self._jwks_url = None if settings.jwt_key else settings.resolved_jwks_url
        self._refresh_interval = refresh_interval_s
        self._min_refetch = min_refetch_interval_s
        # Failed fetches are retried after 0.5 s, 1 s, 2 s ... at most the refetch limit apart.
        self._retry_initial = min(0.5, refresh_interval_s)
        self._retry_max = min(refresh_interval_s, max(min_refetch_interval_s, 1.0))
        self._timeout = aiohttp.ClientTimeout(total=fetch_timeout_s)
        self._jwt = PyJWT({"require": ["exp", "iat", "sub"], "verify_aud": self._audience is not None})
        self._jwt._jws = SegmentDecoder(options=self._jwt._get_sig_options())
        # kid -> parsed key; None is the key of a JWK without a kid.
        self._keys: dict[str | None, RSAPublicKey] = {}
        self._static_key: RSAPublicKey | None = None
        if settings.jwt_key:
            key = load_pem_public_key(settings.jwt_key.encode())
            if not isinstance(key, RSAPublicKey):
                raise ValueError("CLERK_JWT_KEY is not an RSA public key")
            self._static_key = key
        elif self._jwks_url is None:
            raise ValueError("TokenVerifier needs CLERK_FRONTEND_API_URL, CLERK_JWKS_URL or CLERK_JWT_KEY")
        # token -> (exp, result): tokens are presented many times within their ~60 s life.
        self._results: LRUCache[str, tuple[int, VerifiedToken]] = LRUCache(RESULT_CACHE_SIZE)
        self._session: aiohttp.ClientSession | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._last_refetch = float("-inf")
        self._fetch_count = 0
        self._fetched_at: float | None = None  # time.monotonic() of the last successful fetch

    def jwks_age_s(self) -> float:
        """Seconds since the last successful JWKS fetch; +inf before the first; 0 with ``CLERK_JWT_KEY`` (no JWKS)."""
        if self._jwks_url is None:
            return 0.0
        return math.inf if self._fetched_at is None else time.monotonic() - self._fetched_at

    @property
    def fetch_count(self) -> int:
        """How many JWKS HTTP fetches were attempted."""
        return self._fetch_count

    async def start(self) -> None:
        """Fetch the JWKS once (a failure is logged) and start the background refresh."""
        if self._jwks_url is None or self._session is not None:
            return
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        ok = await self._shared_fetch()
        self._refresher = asyncio.create_task(self._refresh_loop(ok), name="jwks-refresh")

    @property
    def ready(self) -> bool:
        """Whether a signing key is available (``CLERK_JWT_KEY``, or a key from the JWKS): health needs one."""
        return self._static_key is not None or bool(self._keys)

    async def close(self) -> None:
        """Stop the background refresh and close the HTTP session."""
        for task in (self._refresher, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refresher = self._inflight = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def verify(self, token: str) -> VerifiedToken:
        """Verify ``token`` and return its identity; raise a TokenError or JwksUnavailable."""
        if not token:
            raise errors.TokenMissing("token is missing")
        size = len(token) if token.isascii() else len(token.encode("utf-8", "surrogatepass"))
        if size > MAX_TOKEN_BYTES:
            raise errors.TokenTooLarge(f"token is larger than {MAX_TOKEN_BYTES} bytes")

        cached = self._results.get(token)
        if cached is not None:
            exp, result = cached
            if exp <= time.time() - self._leeway:
                self._results.pop(token, None)
                raise errors.TokenExpired("token expired")
            _TOKEN_HIT.inc()
            return result
        _TOKEN_MISS.inc()

        header = _unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise errors.TokenMalformed("token header has no alg")
        # Checked before any key lookup, so a forged alg can never cause a fetch.
        if alg != ALGORITHM:
            raise errors.TokenUnsupportedAlg("only RS256 tokens are accepted")

        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise errors.TokenMalformed("token header kid is not a string")
        key = self._lookup(kid) or await self._key_for(kid)
        try:
            claims = self._jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
            )
        except jwt.PyJWTError as exc:
            if isinstance(exc, jwt.ExpiredSignatureError | jwt.ImmatureSignatureError):
                # pyjwt compared a time claim through int(); say malformed if it was no number.
                problem = _claims_problem(jwt.decode(token, options={"verify_signature": False}))
                if problem is not None:
                    raise errors.TokenMalformed(problem) from exc
            raise _translate(exc) from exc
        problem = _claims_problem(claims)
        if problem is not None:
            raise errors.TokenMalformed(problem)
        result = self._result(claims)

        self._results[token] = (int(claims["exp"]), result)
        return result

    def _result(self, claims: dict[str, Any]) -> VerifiedToken:
        subject = claims["sub"]
        if not subject:
            raise errors.TokenMalformed("token subject is empty")
        azp = claims.get("azp")
        if self._parties and (not isinstance(azp, str) or azp not in self._parties):
            raise errors.TokenInvalidAzp("token authorized party is not accepted")
        sid = claims.get("sid")
        try:
            expires_at = datetime.fromtimestamp(int(claims["exp"]), tz=UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise errors.TokenMalformed("token expiry is out of range") from exc
        return VerifiedToken(
            subject=subject,
            session_id=sid if isinstance(sid, str) else "",
            authorized_party=azp if isinstance(azp, str) else "",
            expires_at=expires_at,
            claims=claims,
            actor=_actor(claims),
            pending=_status(claims) == "pending",
        )

    def _lookup(self, kid: str | None) -> RSAPublicKey | None:
        if self._static_key is not None:
            return self._static_key
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _key_for(self, kid: str | None) -> RSAPublicKey:
        key = self._lookup(kid)
        if key is not None:
            return key
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
        elif time.monotonic() - self._last_refetch >= self._min_refetch:
            # One shared fetch for every waiter, at most once per interval: random
            # kids cannot turn into a flood of requests to the JWKS endpoint.
            self._last_refetch = time.monotonic()
            await asyncio.shield(self._shared_fetch())
        key = self._lookup(kid)
        if key is not None:
            return key
        if not self._keys:
            raise errors.JwksUnavailable("signing keys are unavailable")
        raise errors.KeyNotFound("no signing key matches the token")

    def _shared_fetch(self) -> asyncio.Task[bool]:
        if self._inflight is None:
            task = asyncio.create_task(self._fetch(), name="jwks-fetch")
            self._inflight = task

            def done(_: asyncio.Task[bool]) -> None:
                if self._inflight is task:
                    self._inflight = None

            task.add_done_callback(done)
        return self._inflight

    async def _refresh_loop(self, ok: bool) -> None:
        while True:
            if ok:
                await asyncio.sleep(self._refresh_interval)
            ok = await self._fetch_until_ok()

    async def _fetch_until_ok(self) -> bool:
        """Fetch until one succeeds, backing off exponentially (with jitter) up to the refetch limit.

        A process that starts while the JWKS is down thus gets its keys
        within about a second of the endpoint's return, not at the next refresh.
        """
        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(
                multiplier=self._retry_initial, max=self._retry_max, jitter=self._retry_initial
            ),
            retry=retry_if_result(lambda ok: not ok),
        )
        ok: bool = await retrying(self._refresh_once)
        return ok

    async def _refresh_once(self) -> bool:
        try:
            return await asyncio.shield(self._shared_fetch())
        except Exception:
            # The refresh must outlive any surprise; verify() still reports errors.
            log.exception("jwks refresh failed", extra=fields(url=self._jwks_url))
            return False

    async def _fetch(self) -> bool:
        """One JWKS request; install the keys it yields. A failure keeps the old keys."""
        if self._session is None or self._jwks_url is None:
            raise RuntimeError("TokenVerifier.start() was not awaited")
        self._fetch_count += 1
        started = time.monotonic()
        try:
            async with self._session.get(self._jwks_url, headers={"Accept": "application/json"}) as resp:
                resp.raise_for_status()
                document = await resp.json(content_type=None)
            jwks = document.get("keys") if isinstance(document, dict) else None
            if not isinstance(jwks, list):
                raise ValueError("response is not a JWKS document")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning(
                "jwks fetch failed",
                extra=fields(url=self._jwks_url, error=f"{type(exc).__name__}: {exc}", cached_keys=len(self._keys)),
            )
            JWKS_FETCHES.labels("error").inc()
            return False
        keys: dict[str | None, RSAPublicKey] = {}
        for index, jwk in enumerate(jwks):
            try:
                kid, key = _rsa_key_from_jwk(jwk)
            except ValueError as exc:
                kid = jwk.get("kid") if isinstance(jwk, dict) else None
                log.warning("jwks key skipped", extra=fields(index=index, kid=kid, error=str(exc)))
                continue
            keys[kid] = key
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        if not keys:
            log.error(
                "jwks has no usable RS256 key",
                extra=fields(url=self._jwks_url, published=len(jwks), cached_keys=len(self._keys)),
            )
            JWKS_FETCHES.labels("no_usable_key").inc()
            return False
        if keys.keys() != self._keys.keys():
            # A key left the JWKS (perhaps revoked): forget results it vouched for.
            self._results.clear()
        self._keys = keys
        self._fetched_at = time.monotonic()
        JWKS_FETCHES.labels("ok").inc()
        log.info(
            "jwks fetched",
            extra=fields(url=self._jwks_url, keys=len(keys), skipped=len(jwks) - len(keys), ms=duration_ms),
        )
        return True
