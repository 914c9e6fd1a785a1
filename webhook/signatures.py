"""Svix signature verification over the raw body, with the `svix` library.

Any secret of a rotation list is accepted. Svix's own 5-minute timestamp
tolerance applies. Every failure is :class:`SignatureInvalid` (401).

The svix library only verifies bodies that decode as UTF-8. A body that does
not is never a valid event, but whether it is *signed* decides 400 or 401,
so for it alone the same HMAC (Svix's scheme: ``v1,`` base64 HMAC-SHA256 of
``id.timestamp.body`` keyed with the decoded ``whsec_`` secret) is computed
over the raw bytes here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

from svix.webhooks import Webhook, WebhookVerificationError

from service.errors import SignatureInvalid

HEADER_NAMES = ("id", "timestamp", "signature")
TOLERANCE_S = 5 * 60  # Svix's own


def _secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def _signed_raw(keys: list[bytes], body: bytes, svix_id: str, timestamp: str, signature: str) -> str | None:
    """Why a non-UTF-8 ``body`` is not signed by any of ``keys`` (None: it is)."""
    try:
        sent_at = int(timestamp)
    except ValueError:
        return "timestamp outside the allowed tolerance"
    if abs(time.time() - sent_at) > TOLERANCE_S:
        return "timestamp outside the allowed tolerance"
    signed = f"{svix_id}.{sent_at}.".encode() + body
    for key in keys:
        expected = hmac.new(key, signed, hashlib.sha256).digest()
        for versioned in signature.split(" "):
            version, _, encoded = versioned.partition(",")
            try:
                if version == "v1" and hmac.compare_digest(expected, base64.b64decode(encoded, validate=True)):
                    return None
            except (binascii.Error, ValueError):
                continue
    return "signature verification failed"


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A Svix header by short name, ``svix-*`` first, then the ``webhook-*`` alias."""
    return headers.get(f"svix-{name}") or headers.get(f"webhook-{name}")


class SignatureVerifier:
    def __init__(self, secrets: tuple[str, ...]) -> None:
        if not secrets:
            raise ValueError("at least one webhook secret is required")
        self._webhooks = [Webhook(secret) for secret in secrets]
        self._keys = [_secret_key(secret) for secret in secrets]

    def verify(self, body: bytes, headers: Mapping[str, str]) -> str:
        """Check the signature of ``body``; return the svix-id."""
        values = {name: header(headers, name) for name in HEADER_NAMES}
        if not all(values.values()):
            raise SignatureInvalid("missing svix-id, svix-timestamp or svix-signature header")
        svix_id, timestamp, signature = (values[name] or "" for name in HEADER_NAMES)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            problem = _signed_raw(self._keys, body, svix_id, timestamp, signature)
            if problem is not None:
                raise SignatureInvalid(problem) from None
            return svix_id
        svix_headers = {f"svix-{name}": value for name, value in values.items() if value}
        failure = "signature verification failed"
        for webhook in self._webhooks:
            try:
                webhook.verify(body, svix_headers)
            except WebhookVerificationError as exc:
                if "timestamp" in str(exc).lower():
                    failure = "timestamp outside the allowed tolerance"
                continue
            except ValueError:  # malformed signature header, bad base64
                continue
            return svix_id
        raise SignatureInvalid(failure)
