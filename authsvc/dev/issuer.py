"""The development issuer: an RSA key that signs Clerk-style session tokens.

``authsvc dev`` keeps one under ``AUTHSVC_DATA_DIR/dev/`` and serves its JWKS;
tests build one in memory with :meth:`DevIssuer.generate`. It never runs in
production: it only mints tokens for whoever holds the private key file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service.embedded import private_directory

KEY_FILE = "issuer-key.pem"
JWKS_PATH = "/.well-known/jwks.json"


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class DevIssuer:
    """An RS256 signing key with a stable ``kid`` (its RFC 7638 thumbprint)."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self._private_key = private_key
        numbers = private_key.public_key().public_numbers()
        self._n = _b64url_uint(numbers.n)
        self._e = _b64url_uint(numbers.e)
        # RFC 7638: SHA-256 over the required members, sorted, no whitespace.
        canonical = json.dumps({"e": self._e, "kty": "RSA", "n": self._n}, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode("ascii")).digest()
        self.kid: str = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    @classmethod
    def generate(cls) -> DevIssuer:
        """A fresh in-memory RSA-2048 issuer (tests)."""
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def load_or_create(cls, directory: Path) -> DevIssuer:
        """The issuer whose key is ``directory/issuer-key.pem``, created (mode 0600) on first use."""
        private_directory(directory)
        path = directory / KEY_FILE
        if not path.exists():
            issuer = cls.generate()
            pem = issuer._private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            # Write a temporary file, then link it into place: the key file either
            # exists complete or not at all, and a concurrent creator's key wins
            # cleanly instead of being overwritten.
            tmp = directory / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
                try:
                    os.link(tmp, path)
                    return issuer
                except FileExistsError:
                    pass
            finally:
                tmp.unlink(missing_ok=True)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} does not hold an RSA private key")
        return cls(key)

    def jwks(self) -> dict[str, Any]:
        """The JWKS document publishing this key."""
        jwk = {"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256", "n": self._n, "e": self._e}
        return {"keys": [jwk]}

    def public_pem(self) -> str:
        """The public key as PEM (what ``CLERK_JWT_KEY`` holds)."""
        return (
            self._private_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode("ascii")
        )

    def mint(
        self,
        subject: str,
        *,
        issuer: str,
        azp: str | None = "http://localhost:3000",
        session_id: str | None = None,
        ttl_s: int = 60,
        audience: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        now: float | None = None,
        algorithm: str = "RS256",
    ) -> str:
        """A Clerk-style session token for ``subject``.

        Claims: ``sub, sid, iss, iat, nbf, exp`` (+ ``azp``, ``aud``) then ``extra``;
        headers: ``kid`` then ``headers``. A ``None`` value in ``extra`` or
        ``headers`` removes that claim or header (tests build broken tokens that way).
        ``algorithm`` may be another RS* algorithm, for tests that must be refused.
        """
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "sub": subject,
            "sid": session_id or f"sess_{secrets.token_hex(12)}",
            "iss": issuer,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl_s,
        }
        if azp is not None:
            claims["azp"] = azp
        if audience is not None:
            claims["aud"] = audience
        claims.update(extra or {})
        header = {"kid": self.kid, **(headers or {})}
        return jwt.encode(
            {k: v for k, v in claims.items() if v is not None},
            self._private_key,
            algorithm=algorithm,
            headers={k: v for k, v in header.items() if v is not None},
        )


def jwks_routes(issuer: DevIssuer) -> list[web.RouteDef]:
    """``GET /.well-known/jwks.json`` serving ``issuer``'s JWKS."""

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(issuer.jwks(), headers={"Cache-Control": "public, max-age=300"})

    return [web.get(JWKS_PATH, jwks)]
