"""`authsvc dev`: both halves in one process, with a development issuer and webhook secret.

Everything lives under ``AUTHSVC_DATA_DIR/dev/``: the issuer's RSA key (made
once), the ``whsec_`` secret (made once) and ``dev.json``, which tells
``dev-token`` and ``dev-webhook`` where the running dev process listens.

Callers are not required: the walk-through's grpcurl lines work as printed.
``AUTHSVC_CALLERS_FILE``, when set, is enforced as by ``authsvc grpc``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from authsvc.dev.issuer import DevIssuer, jwks_routes
from service.app import grpc_service
from service.embedded import private_directory
from service.settings import Settings
from service.startup import StartupError, served_database, split_addr, until_signalled
from service.tracing import traced
from webhook.main import sidecar

DEV_AZP = "http://localhost:3000"


def dev_dir(settings: Settings) -> Path:
    return settings.data_dir / "dev"


def _write_private(path: Path, text: str) -> None:
    private_directory(path.parent)
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


def state_of(settings: Settings) -> dict[str, str]:
    path = dev_dir(settings) / "dev.json"
    if not path.is_file():
        host, port = split_addr(settings.webhook_addr)
        return {"issuer": f"http://{host}:{port}", "webhook_url": f"http://{host}:{port}{settings.webhook_path}"}
    state: dict[str, str] = json.loads(path.read_text())
    return state


def callers_line(settings: Settings) -> str:
    """The banner's word on callers: ``authsvc dev`` lets anyone call unless AUTHSVC_CALLERS_FILE is set."""
    if settings.callers_file is None:
        return "anyone (set AUTHSVC_CALLERS_FILE to require caller keys)"
    return f"listed in {settings.callers_file}: add -H 'x-authsvc-key: YOUR_KEY' to the grpcurl lines below"


def banner(state: dict[str, str]) -> str:
    grpc_addr = state["grpc_addr"]
    return f"""
authsvc dev is running (embedded database, development issuer; never use in production)

  webhook sidecar  {state["webhook_url"]}
  gRPC             {grpc_addr}   (health on, reflection {state["reflection"]})
  callers          {state["callers"]}
  issuer (iss)     {state["issuer"]}   JWKS: {state["issuer"]}/.well-known/jwks.json
  webhook secret   {state["secret"]}
  data             {state["data_dir"]}

In another terminal (from the repository: source .venv/bin/activate):

  authsvc dev-webhook user.created --id user_1 --role superadmin --email ada@example.com \\
      --first-name Ada --last-name Lovelace
  authsvc dev-webhook user.created --id user_2 --role staff
  TOKEN=$(authsvc dev-token user_1)

  grpcurl -plaintext {grpc_addr} list
  grpcurl -plaintext -d "{{\\"token\\": \\"$TOKEN\\", \\"min_role\\": \\"ROLE_ADMIN\\"}}" \\
      {grpc_addr} authsvc.v1.AuthService/VerifyToken
  grpcurl -plaintext -d '{{"external_id": "user_2"}}' {grpc_addr} authsvc.v1.AuthService/GetUser
  grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{{"external_id": "user_2", "role": "ROLE_ADMIN"}}' \\
      {grpc_addr} authsvc.v1.AuthService/SetRole
  grpcurl -plaintext {grpc_addr} grpc.health.v1.Health/Check

Revoke a session (its tokens are refused from then on, everywhere):

  DEMO=$(authsvc dev-token user_1 --sid sess_demo)
  authsvc dev-webhook session.revoked --id user_1 --sid sess_demo
  grpcurl -plaintext -d "{{\\"token\\": \\"$DEMO\\"}}" {grpc_addr} authsvc.v1.AuthService/VerifyToken

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
    settings = settings.model_copy(
        update=dict(
            webhook_secrets=(secret,),
            frontend_api_url=issuer_url,
            jwks_url=None,
            jwt_key=None,
            authorized_parties=settings.authorized_parties or (DEV_AZP,),
        )
    )
    async with (
        traced("authsvc-dev") as tracing,
        served_database(settings) as database,
        sidecar(settings, database.store, jwks_routes(issuer), monitor=database.monitor),
        grpc_service(settings, database.store, monitor=database.monitor, tracing=tracing) as service,
    ):
        state = {
            "issuer": issuer_url,
            "webhook_url": f"{issuer_url}{settings.webhook_path}",
            "grpc_addr": f"{settings.grpc_addr.rsplit(':', 1)[0]}:{service.port}",
            "secret": secret,
            "data_dir": str(settings.data_dir.resolve()),
            "reflection": "on" if settings.reflection else "off",
            "callers": callers_line(settings),
        }
        _write_private(directory / "dev.json", json.dumps(state, indent=2))
        print(banner(state), flush=True)
        await until_signalled(database)


def session_claims(*, actor: str | None = None, pending: bool = False, fva: list[int] | None = None) -> dict[str, Any]:
    """Clerk's session claims for ``dev-token``: ``act`` (impersonated by ``actor``), ``sts`` and ``fva``."""
    claims: dict[str, Any] = {}
    if actor is not None:
        claims["act"] = {"iss": "https://dashboard.clerk.com", "sid": f"sess_{secrets.token_hex(12)}", "sub": actor}
    if pending:
        claims["sts"] = "pending"
    if fva is not None:
        claims["fva"] = fva
    return claims


def print_token(
    settings: Settings,
    subject: str,
    *,
    ttl_s: int = 3600,
    session_id: str | None = None,
    claims: dict[str, Any] | None = None,
) -> int:
    """Print a session token for ``subject`` (with ``session_id`` and more ``claims``) signed by the dev issuer."""
    directory = dev_dir(settings)
    if not (directory / "issuer-key.pem").is_file():
        print(f"authsvc: no development issuer under {directory}; run `authsvc dev` first", file=sys.stderr)
        return 1
    issuer = DevIssuer.load_or_create(directory)
    issuer_url = state_of(settings)["issuer"]
    print(issuer.mint(subject, issuer=issuer_url, azp=DEV_AZP, ttl_s=ttl_s, session_id=session_id, extra=claims))
    return 0
