"""Svix signature verification over the raw body, with the `svix` library.

Any secret of a rotation list is accepted. Svix's own 5-minute timestamp
tolerance applies. Every failure is :class:`SignatureInvalid` (401).
"""

from __future__ import annotations

from collections.abc import Mapping

from svix.webhooks import Webhook, WebhookVerificationError

from service.errors import SignatureInvalid

HEADER_NAMES = ("id", "timestamp", "signature")


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A Svix header by short name, ``svix-*`` first, then the ``webhook-*`` alias."""
    return headers.get(f"svix-{name}") or headers.get(f"webhook-{name}")


class SignatureVerifier:
    def __init__(self, secrets: tuple[str, ...]) -> None:
        if not secrets:
            raise ValueError("at least one webhook secret is required")
        self._webhooks = [Webhook(secret) for secret in secrets]

    def verify(self, body: bytes, headers: Mapping[str, str]) -> str:
        """Check the signature of ``body``; return the svix-id."""
        values = {name: header(headers, name) for name in HEADER_NAMES}
        if not all(values.values()):
            raise SignatureInvalid("missing svix-id, svix-timestamp or svix-signature header")
        svix_headers = {f"svix-{name}": value for name, value in values.items() if value}
        failure = "signature verification failed"
        for webhook in self._webhooks:
            try:
                webhook.verify(body, svix_headers)
            except WebhookVerificationError as exc:
                if "timestamp" in str(exc).lower():
                    failure = "timestamp outside the allowed tolerance"
                continue
            except ValueError:  # malformed signature header, bad base64, non-UTF-8 body
                continue
            svix_id = values["id"]
            assert svix_id is not None
            return svix_id
        raise SignatureInvalid(failure)
