"""Typed, frozen settings read once from the environment and `.env`.

Only the CLI calls :func:`load`; everything else receives a :class:`Settings`.
Tests build ``Settings(...)`` directly.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

DeleteMode = Literal["soft", "hard"]
LOG_LEVELS = ("debug", "info", "warning", "error")


class SettingsError(Exception):
    """One or more settings are missing or invalid; each problem is one line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Settings:
    mongodb_uri: str | None = None
    mongodb_db: str = "authsvc"
    data_dir: Path = Path(".data")
    webhook_secrets: tuple[str, ...] = ()
    frontend_api_url: str | None = None
    jwks_url: str | None = None
    jwt_key: str | None = None
    authorized_parties: tuple[str, ...] = ()
    jwt_audience: str | None = None
    clerk_secret_key: str | None = field(default=None, repr=False)
    clerk_api_url: str = "https://api.clerk.com"
    grpc_addr: str = "127.0.0.1:50051"
    webhook_addr: str = "127.0.0.1:8080"
    webhook_path: str = "/clerk-users-webhook"
    delete_mode: DeleteMode = "soft"
    clock_skew_s: int = 5
    log_level: str = "info"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    env: str = "development"

    @property
    def issuer(self) -> str | None:
        """The expected ``iss``: the Frontend API URL without a trailing slash."""
        return self.frontend_api_url.rstrip("/") if self.frontend_api_url else None

    @property
    def resolved_jwks_url(self) -> str | None:
        if self.jwks_url:
            return self.jwks_url
        if self.issuer:
            return f"{self.issuer}/.well-known/jwks.json"
        return None

    def check_webhook(self) -> None:
        """Raise :class:`SettingsError` unless the sidecar can start."""
        problems = []
        if not self.webhook_secrets:
            problems.append("CLERK_WEBHOOK_SECRET is required by the webhook sidecar (whsec_...)")
        if not self.webhook_path.startswith("/"):
            problems.append("AUTHSVC_WEBHOOK_PATH must start with '/'")
        if problems:
            raise SettingsError(problems)

    def check_grpc(self) -> None:
        """Raise :class:`SettingsError` unless the gRPC service can start."""
        problems = []
        if not self.frontend_api_url and not self.jwt_key:
            problems.append("CLERK_FRONTEND_API_URL (or CLERK_JWT_KEY) is required by the gRPC service")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("AUTHSVC_TLS_CERT and AUTHSVC_TLS_KEY must be set together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("AUTHSVC_TLS_CLIENT_CA needs AUTHSVC_TLS_CERT and AUTHSVC_TLS_KEY")
        if problems:
            raise SettingsError(problems)


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a `.env` file: ``KEY=value`` lines, ``#`` comments, optional quotes."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def check_webhook_secret(secret: str) -> str | None:
    """Return a problem description for a malformed ``whsec_`` secret, else None."""
    if not secret.startswith("whsec_"):
        return "must start with 'whsec_'"
    body = secret[len("whsec_") :].rstrip("=")
    try:
        decoded = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        return "is not valid base64 after 'whsec_'"
    if len(decoded) < 16:
        return "is too short (at least 16 bytes of key)"
    return None


def _addr_problem(name: str, value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"{name} must be HOST:PORT, got {value!r}"
    return None


def _url_problem(name: str, value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"{name} must be an http(s) URL, got {value!r}"
    return None


def load(environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")) -> Settings:
    """Read settings from ``environ`` (default: the process environment) over ``.env``."""
    env: dict[str, str] = read_dotenv(dotenv) if dotenv else {}
    env.update(os.environ if environ is None else environ)

    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    problems: list[str] = []

    secrets = tuple((get("CLERK_WEBHOOK_SECRET") or "").split())
    for index, secret in enumerate(secrets, 1):
        problem = check_webhook_secret(secret)
        if problem:
            which = f" (secret {index} of {len(secrets)})" if len(secrets) > 1 else ""
            problems.append(f"CLERK_WEBHOOK_SECRET{which} {problem}")

    for name in ("CLERK_FRONTEND_API_URL", "CLERK_JWKS_URL", "CLERK_API_URL"):
        value = get(name)
        if value and (problem := _url_problem(name, value)):
            problems.append(problem)
    for name in ("AUTHSVC_GRPC_ADDR", "AUTHSVC_WEBHOOK_ADDR"):
        value = get(name)
        if value and (problem := _addr_problem(name, value)):
            problems.append(problem)

    jwt_key = get("CLERK_JWT_KEY")
    if jwt_key:
        jwt_key = jwt_key.replace("\\n", "\n")
        if "-----BEGIN PUBLIC KEY-----" not in jwt_key:
            problems.append("CLERK_JWT_KEY must be a PEM public key (-----BEGIN PUBLIC KEY-----)")

    delete_mode = get("AUTHSVC_DELETE_MODE") or "soft"
    if delete_mode not in ("soft", "hard"):
        problems.append(f"AUTHSVC_DELETE_MODE must be 'soft' or 'hard', got {delete_mode!r}")

    skew_raw = get("AUTHSVC_CLOCK_SKEW_S") or "5"
    skew = 5
    if not skew_raw.isdigit() or int(skew_raw) > 300:
        problems.append(f"AUTHSVC_CLOCK_SKEW_S must be an integer from 0 to 300, got {skew_raw!r}")
    else:
        skew = int(skew_raw)

    log_level = (get("AUTHSVC_LOG_LEVEL") or "info").lower()
    if log_level not in LOG_LEVELS:
        problems.append(f"AUTHSVC_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")

    def path(name: str) -> Path | None:
        value = get(name)
        if value is None:
            return None
        if not Path(value).is_file():
            problems.append(f"{name} points at {value!r}, which is not a readable file")
        return Path(value)

    tls_cert, tls_key, tls_ca = path("AUTHSVC_TLS_CERT"), path("AUTHSVC_TLS_KEY"), path("AUTHSVC_TLS_CLIENT_CA")

    if problems:
        raise SettingsError(problems)

    parties = tuple(p.strip().rstrip("/") for p in (get("CLERK_AUTHORIZED_PARTIES") or "").split(",") if p.strip())
    return Settings(
        mongodb_uri=get("MONGODB_URI"),
        mongodb_db=get("MONGODB_DB") or "authsvc",
        data_dir=Path(get("AUTHSVC_DATA_DIR") or ".data"),
        webhook_secrets=secrets,
        frontend_api_url=get("CLERK_FRONTEND_API_URL"),
        jwks_url=get("CLERK_JWKS_URL"),
        jwt_key=jwt_key,
        authorized_parties=parties,
        jwt_audience=get("CLERK_JWT_AUDIENCE"),
        clerk_secret_key=get("CLERK_SECRET_KEY"),
        clerk_api_url=(get("CLERK_API_URL") or "https://api.clerk.com").rstrip("/"),
        grpc_addr=get("AUTHSVC_GRPC_ADDR") or "127.0.0.1:50051",
        webhook_addr=get("AUTHSVC_WEBHOOK_ADDR") or "127.0.0.1:8080",
        webhook_path=get("AUTHSVC_WEBHOOK_PATH") or "/clerk-users-webhook",
        delete_mode="hard" if delete_mode == "hard" else "soft",
        clock_skew_s=skew,
        log_level=log_level,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_ca,
        env=(get("AUTHSVC_ENV") or "development").lower(),
    )
