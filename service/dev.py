"""`authsvc dev` and its companions: one process, a development issuer and webhook secret.

Everything lives under ``AUTHSVC_DATA_DIR/dev/``: the issuer's RSA key (made
once), the ``whsec_`` secret (made once) and ``dev.json``, which tells
``dev-token`` and ``dev-webhook`` where the running dev process listens.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from svix.webhooks import Webhook

from service.devissuer import DevIssuer, jwks_routes
from service.runtime import StartupError, open_store, split_addr, start_grpc_stack, start_webhook, until_signalled
from service.settings import Settings

DEV_AZP = "http://localhost:3000"


def dev_dir(settings: Settings) -> Path:
    return settings.data_dir / "dev"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def webhook_secret(directory: Path) -> str:
    """The development ``whsec_`` secret, generated on first use and kept."""
    path = directory / "webhook-secret"
    if path.is_file():
        return path.read_text().strip()
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    _write_private(path, secret + "\n")
    return secret


def _state(settings: Settings) -> dict[str, str]:
    path = dev_dir(settings) / "dev.json"
    if not path.is_file():
        host, port = split_addr(settings.webhook_addr)
        return {"issuer": f"http://{host}:{port}", "webhook_url": f"http://{host}:{port}{settings.webhook_path}"}
    state: dict[str, str] = json.loads(path.read_text())
    return state


def banner(state: dict[str, str]) -> str:
    grpc_addr = state["grpc_addr"]
    return f"""
authsvc dev is running (embedded database, development issuer; never use in production)

  webhook sidecar  {state["webhook_url"]}
  gRPC             {grpc_addr}   (reflection and health on)
  issuer (iss)     {state["issuer"]}   JWKS: {state["issuer"]}/.well-known/jwks.json
  webhook secret   {state["secret"]}
  data             {state["data_dir"]}

In another terminal (from the repository: source .venv/bin/activate):

  authsvc dev-webhook user.created --id user_1 --role superadmin --email ada@example.com --first-name Ada
  authsvc dev-webhook user.created --id user_2 --role staff
  TOKEN=$(authsvc dev-token user_1)

  grpcurl -plaintext {grpc_addr} list
  grpcurl -plaintext -d "{{\\"token\\": \\"$TOKEN\\", \\"min_role\\": \\"ROLE_ADMIN\\"}}" \\
      {grpc_addr} authsvc.v1.AuthService/VerifyToken
  grpcurl -plaintext -d '{{"external_id": "user_2"}}' {grpc_addr} authsvc.v1.AuthService/GetUser
  grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{{"external_id": "user_2", "role": "ROLE_ADMIN"}}' \\
      {grpc_addr} authsvc.v1.AuthService/SetRole
  grpcurl -plaintext {grpc_addr} grpc.health.v1.Health/Check

Ctrl-C stops it; data stays in {state["data_dir"]}.
"""


async def run(settings: Settings) -> None:
    """Run the sidecar and the gRPC service in one process with development credentials."""
    if settings.env == "production":
        raise StartupError("authsvc dev refuses to run with AUTHSVC_ENV=production")
    directory = dev_dir(settings)
    issuer = DevIssuer.load_or_create(directory)
    secret = webhook_secret(directory)
    host, port = split_addr(settings.webhook_addr)
    issuer_url = f"http://{host}:{port}"
    settings = replace(
        settings,
        webhook_secrets=(secret,),
        frontend_api_url=issuer_url,
        jwks_url=None,
        jwt_key=None,
        authorized_parties=settings.authorized_parties or (DEV_AZP,),
    )
    database, store = await open_store(settings)
    try:
        runner, _ = await start_webhook(settings, store, jwks_routes(issuer))
        try:
            stack = await start_grpc_stack(settings, store)
            try:
                state = {
                    "issuer": issuer_url,
                    "webhook_url": f"{issuer_url}{settings.webhook_path}",
                    "grpc_addr": f"{settings.grpc_addr.rsplit(':', 1)[0]}:{stack.service.port}",
                    "secret": secret,
                    "data_dir": str(settings.data_dir.resolve()),
                }
                _write_private(directory / "dev.json", json.dumps(state, indent=2))
                print(banner(state), flush=True)
                await until_signalled()
            finally:
                await stack.stop()
        finally:
            await runner.cleanup()
    finally:
        await database.close()


def print_token(settings: Settings, subject: str, *, ttl_s: int = 3600) -> int:
    """Print a session token for ``subject`` signed by the development issuer."""
    directory = dev_dir(settings)
    if not (directory / "issuer-key.pem").is_file():
        print(f"authsvc: no development issuer under {directory}; run `authsvc dev` first", file=sys.stderr)
        return 1
    issuer = DevIssuer.load_or_create(directory)
    print(issuer.mint(subject, issuer=_state(settings)["issuer"], azp=DEV_AZP, ttl_s=ttl_s))
    return 0


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
    url = _state(settings)["webhook_url"]
    try:
        async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
            text = await response.text()
    except aiohttp.ClientError:
        print(f"authsvc: cannot reach {url}; is `authsvc dev` running?", file=sys.stderr)
        return 1
    print(f"{response.status} {text}")
    return 0 if response.status == 200 else 1
