"""Clerk webhook events for development and tests: built as Clerk shapes them, signed with the svix library."""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp
from svix.webhooks import Webhook

from authsvc.dev.run import dev_dir, state_of
from service.settings import Settings


def clerk_event(
    event_type: str,
    user_id: str,
    *,
    role: str | None = None,
    email: str | None = None,
    first_name: str | None = None,
    last_name: str | None = None,
    now_ms: int | None = None,
) -> dict[str, Any]:
    """A Clerk webhook body of ``event_type`` shaped as Clerk sends it."""
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    envelope: dict[str, Any] = {
        "object": "event",
        "type": event_type,
        "timestamp": now,
        "instance_id": "ins_dev",
        "event_attributes": {},
    }
    if event_type == "user.deleted":
        envelope["data"] = {"object": "user", "id": user_id, "deleted": True}
    elif event_type == "session.created":
        envelope["data"] = {
            "object": "session",
            "id": f"sess_{uuid.uuid4().hex[:24]}",
            "user_id": user_id,
            "status": "active",
            "created_at": now,
            "updated_at": now,
        }
    else:
        email_id = f"idn_{uuid.uuid4().hex[:24]}"
        address = email or f"{user_id}@example.com"
        envelope["data"] = {
            "object": "user", "id": user_id, "external_id": None, "username": None,
            "first_name": first_name, "last_name": last_name,
            "primary_email_address_id": email_id,
            "email_addresses": [{"id": email_id, "object": "email_address", "email_address": address}],
            "public_metadata": {"role": role} if role else {},
            "private_metadata": {}, "unsafe_metadata": {},
            "banned": False, "locked": False, "created_at": now, "updated_at": now,
        }  # fmt: skip
    return envelope


def signed_headers(secret: str, body: str, msg_id: str | None = None, *, at: datetime | None = None) -> dict[str, str]:
    """Svix headers for ``body``, signed with the `svix` library (at ``at``, default now)."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    now = at or datetime.now(UTC)
    return {
        "svix-id": msg_id,
        "svix-timestamp": str(int(now.timestamp())),
        "svix-signature": Webhook(secret).sign(msg_id, now, body),
        "content-type": "application/json",
    }


async def send_event(settings: Settings, event: dict[str, Any]) -> int:
    """Sign one Clerk event (see :func:`clerk_event`) with the dev secret and POST it to the running dev sidecar."""
    secret_path = dev_dir(settings) / "webhook-secret"
    if not secret_path.is_file():
        print(f"authsvc: no development secret under {dev_dir(settings)}; run `authsvc dev` first", file=sys.stderr)
        return 1
    body = json.dumps(event)
    headers = signed_headers(secret_path.read_text().strip(), body)
    url = state_of(settings)["webhook_url"]
    try:
        async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
            text = await response.text()
    except aiohttp.ClientError:
        print(f"authsvc: cannot reach {url}; is `authsvc dev` running?", file=sys.stderr)
        return 1
    print(f"{response.status} {text}")
    return 0 if response.status == 200 else 1
