"""Clerk webhook events for development and tests: built as Clerk shapes them, signed with the svix library."""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import grpc
from svix.webhooks import Webhook

from authsvc.dev.run import dev_dir, state_of
from authsvc_client.v1 import authsvc_pb2, authsvc_pb2_grpc
from service.convert import role_from_proto
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
    session_id: str | None = None,
) -> dict[str, Any]:
    """A Clerk webhook body of ``event_type`` shaped as Clerk sends it (``session_id``: the ``session.*`` sid)."""
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
    elif event_type.startswith("session."):
        # session.created is active; session.revoked/ended/removed carry the session in its final status.
        status = "active" if event_type == "session.created" else event_type.partition(".")[2]
        envelope["data"] = {
            "object": "session",
            "id": session_id or f"sess_{uuid.uuid4().hex[:24]}",
            "user_id": user_id,
            "status": status,
            "expire_at": now + 7 * 24 * 3600 * 1000,
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


@dataclass(frozen=True)
class Changes:
    """The profile fields given on the ``dev-webhook`` command line (None: not given)."""

    role: str | None = None
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None


async def held_user(grpc_addr: str, user_id: str) -> authsvc_pb2.User | None:
    """The user the running dev service holds (``GetUser``), or None when it has none by that id."""
    async with grpc.aio.insecure_channel(grpc_addr) as channel:
        stub = authsvc_pb2_grpc.AuthServiceStub(channel)
        try:
            user: authsvc_pb2.User = await stub.GetUser(authsvc_pb2.GetUserRequest(external_id=user_id), timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
    return user


def merge(changes: Changes, held: authsvc_pb2.User) -> tuple[Changes, list[str]]:
    """``changes`` on top of ``held``: a Clerk update carries the whole user, so what is not given is kept.

    Returns the fields to send and a description of each one kept. Clerk sends
    first and last name apart while the database keeps one name, so a name given
    in half keeps the other half of the stored name (split at its first space).
    """
    kept: list[str] = []
    merged = changes
    role = role_from_proto(held.role)
    if changes.role is None and role is not None:
        merged = replace(merged, role=role.wire)
        kept.append(f"role {role.wire}")
    if changes.email is None and held.email:
        merged = replace(merged, email=held.email)
        kept.append(f"email {held.email}")
    first, _, last = held.name.partition(" ")
    if changes.first_name is None and changes.last_name is None:
        merged = replace(merged, first_name=held.name)
        kept.append(f"name {held.name!r}")
    elif changes.first_name is None and first:
        merged = replace(merged, first_name=first)
        kept.append(f"first name {first!r} (from the stored name {held.name!r})")
    elif changes.last_name is None and last:
        merged = replace(merged, last_name=last)
        kept.append(f"last name {last!r} (from the stored name {held.name!r})")
    return merged, kept


async def send_dev_event(
    settings: Settings, event_type: str, user_id: str, changes: Changes, *, session_id: str | None = None
) -> int:
    """``authsvc dev-webhook``: build the event and send it to the running dev sidecar.

    ``user.updated`` sends what is given on top of the user the dev service
    holds (read through its ``GetUser``), and says on stderr what it kept;
    it refuses when that user cannot be read, rather than reset the role or email.
    """
    if event_type == "user.updated":
        grpc_addr = state_of(settings).get("grpc_addr")
        if grpc_addr is None:
            print(
                f"authsvc: no running dev service recorded under {dev_dir(settings)}; run `authsvc dev` first",
                file=sys.stderr,
            )
            return 1
        try:
            held = await held_user(grpc_addr, user_id)
        except grpc.aio.AioRpcError as exc:
            print(
                f"authsvc: cannot read {user_id} from {grpc_addr} ({exc.code().name}): is `authsvc dev` running? "
                "Nothing was sent, so nothing was overwritten",
                file=sys.stderr,
            )
            return 1
        if held is None:
            print(
                f"authsvc: {user_id} is not in the dev database; user.updated sends only what you gave "
                "(role staff and a generated email unless given)",
                file=sys.stderr,
            )
        else:
            changes, kept = merge(changes, held)
            if kept:
                print(
                    f"authsvc: user.updated {user_id} keeps from the dev database: {', '.join(kept)}", file=sys.stderr
                )
    event = clerk_event(
        event_type,
        user_id,
        role=changes.role,
        email=changes.email,
        first_name=changes.first_name,
        last_name=changes.last_name,
        session_id=session_id,
    )
    return await send_event(settings, event)
