"""Typed, frozen settings read once from the environment and `.env` (pydantic + python-dotenv).

Only the CLI calls :func:`load`; everything else receives a :class:`Settings`.
Tests build ``Settings(...)`` directly, by field name. Each field's alias is
its environment variable; its description is what ``authsvc CMD --help``
prints. Every problem is collected and reported at once, one line each.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.cpus import available_cpus

DeleteMode = Literal["soft", "hard"]
Environment = Literal["development", "production"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogRpcs = Literal["all", "errors", "off"]


class SettingsError(Exception):
    """One or more settings are missing or invalid; each problem is one line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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


def _split(value: object, sep: str | None) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(sep) if part.strip())
    return value


def _addr(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    return value


def _url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s) URL, got {value!r}")
    return value


def _switch(value: object) -> object:
    if isinstance(value, str):
        lowered = value.lower()
        if lowered in ("on", "true", "1", "yes"):
            return True
        if lowered in ("off", "false", "0", "no"):
            return False
        raise ValueError(f"must be 'on' or 'off', got {value!r}")
    return value


def _file(value: Path | None) -> Path | None:
    if value is not None and not value.is_file():
        raise ValueError(f"points at {str(value)!r}, which is not a readable file")
    return value


class Settings(BaseModel):
    """Every setting of authsvc; the alias of each field is its environment variable."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    mongodb_uri: str | None = Field(
        None, alias="MONGODB_URI", description="MongoDB URI (a replica set in production); unset: embedded server"
    )
    mongodb_db: str = Field("authsvc", alias="MONGODB_DB", description="database name")
    data_dir: Path = Field(
        Path(".data"), alias="AUTHSVC_DATA_DIR", description="embedded database files, development keys"
    )
    webhook_secrets: tuple[str, ...] = Field(
        (), alias="CLERK_WEBHOOK_SECRET", description="whsec_... (several, space-separated, during a rotation)"
    )
    frontend_api_url: str | None = Field(
        None, alias="CLERK_FRONTEND_API_URL", description="the issuer (iss) of session tokens; JWKS below it"
    )
    jwks_url: str | None = Field(None, alias="CLERK_JWKS_URL", description="overrides the JWKS address")
    jwt_key: str | None = Field(
        None, alias="CLERK_JWT_KEY", description="PEM RSA public key: networkless verification", repr=False
    )
    authorized_parties: tuple[str, ...] = Field(
        (), alias="CLERK_AUTHORIZED_PARTIES", description="comma-separated allowed azp origins; unset: not checked"
    )
    jwt_audience: str | None = Field(None, alias="CLERK_JWT_AUDIENCE", description="required aud; unset: not checked")
    clerk_secret_key: str | None = Field(
        None,
        alias="CLERK_SECRET_KEY",
        description="Backend API key: role write-through, sync, just-in-time fetches",
        repr=False,
    )
    clerk_api_url: str = Field("https://api.clerk.com", alias="CLERK_API_URL", description="Backend API base URL")
    grpc_addr: str = Field("127.0.0.1:50051", alias="AUTHSVC_GRPC_ADDR", description="gRPC listen address")
    webhook_addr: str = Field("127.0.0.1:8080", alias="AUTHSVC_WEBHOOK_ADDR", description="sidecar listen address")
    webhook_path: str = Field("/clerk-users-webhook", alias="AUTHSVC_WEBHOOK_PATH", description="webhook path")
    delete_mode: DeleteMode = Field(
        "soft", alias="AUTHSVC_DELETE_MODE", description="soft: keep the profile inactive; hard: keep a tombstone"
    )
    clock_skew_s: int = Field(
        5, ge=0, le=300, alias="AUTHSVC_CLOCK_SKEW_S", description="leeway in seconds for exp/nbf/iat"
    )
    log_level: LogLevel = Field("info", alias="AUTHSVC_LOG_LEVEL", description="debug, info, warning or error")
    log_rpcs: LogRpcs = Field(
        "all", alias="AUTHSVC_LOG_RPCS", description="the per-RPC log line: all, errors (non-OK only) or off"
    )
    tls_cert: Path | None = Field(None, alias="AUTHSVC_TLS_CERT", description="gRPC TLS certificate (PEM file)")
    tls_key: Path | None = Field(None, alias="AUTHSVC_TLS_KEY", description="gRPC TLS private key (PEM file)")
    tls_client_ca: Path | None = Field(
        None, alias="AUTHSVC_TLS_CLIENT_CA", description="client CA: with it, mutual TLS is required"
    )
    env: Environment = Field(
        "development",
        alias="AUTHSVC_ENV",
        description="development or production (production: MONGODB_URI required, authsvc dev refused)",
    )
    drain_s: float = Field(
        2.0, ge=0, le=300, alias="AUTHSVC_DRAIN_S", description="on SIGTERM: NOT_SERVING, keep serving this long"
    )
    workers: int = Field(
        1,
        ge=1,
        le=256,
        alias="AUTHSVC_WORKERS",
        description="worker processes (an integer, or auto = the CPUs this process may use: affinity, cgroup quota)",
    )
    metrics_addr: str = Field(
        "127.0.0.1:9464", alias="AUTHSVC_METRICS_ADDR", description="where authsvc grpc serves GET /metrics"
    )
    webhook_metrics_addr: str | None = Field(
        None,
        alias="AUTHSVC_WEBHOOK_METRICS_ADDR",
        description="when set, the sidecar serves GET /metrics there and no longer on its public address",
    )
    sync_interval_s: float = Field(
        0.0, ge=0, alias="AUTHSVC_SYNC_INTERVAL_S", description="the sidecar reconciles from Clerk this often; 0: off"
    )
    jit_sync: bool = Field(
        True, alias="AUTHSVC_JIT_SYNC", description="on: VerifyToken fetches an unsynced user from Clerk"
    )
    ext_authz: bool = Field(
        False, alias="AUTHSVC_EXT_AUTHZ", description="on: serve Envoy's envoy.service.auth.v3.Authorization/Check"
    )
    stale_s: float = Field(
        60.0,
        ge=0,
        le=86400,
        alias="AUTHSVC_STALE_S",
        description="answer from the user cache this long while the database is unreachable; 0: fail closed",
    )
    max_connection_age_s: float = Field(
        300.0,
        ge=0,
        le=86400,
        alias="AUTHSVC_MAX_CONNECTION_AGE_S",
        description="end each gRPC connection gracefully after about this long (rebalancing); 0: never",
    )
    callers_file: Path | None = Field(
        None,
        alias="AUTHSVC_CALLERS_FILE",
        description="TOML file of the callers allowed which methods; unset: anyone may call anything",
    )
    reflection: bool = Field(True, alias="AUTHSVC_REFLECTION", description="off: no gRPC server reflection")
    accept_pending_sessions: bool = Field(
        False,
        alias="AUTHSVC_ACCEPT_PENDING_SESSIONS",
        description="true: accept tokens whose sts claim is pending (else SESSION_PENDING)",
        json_schema_extra={"shown": "false"},
    )
    setrole_max_factor_age_min: int = Field(
        0,
        ge=0,
        alias="AUTHSVC_SETROLE_MAX_FACTOR_AGE_MIN",
        description="SetRole needs a second factor verified at most this many minutes ago (fva); 0: off",
    )

    # --- parsing and validation of single fields --------------------------------
    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: object) -> object:
        return _split(value, None)

    @field_validator("webhook_secrets")
    @classmethod
    def _check_secrets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        problems = []
        for index, secret in enumerate(value, 1):
            problem = check_webhook_secret(secret)
            if problem:
                which = f"secret {index} of {len(value)} " if len(value) > 1 else ""
                problems.append(f"{which}{problem}")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("authorized_parties", mode="before")
    @classmethod
    def _split_parties(cls, value: object) -> object:
        value = _split(value, ",")
        if isinstance(value, tuple):
            return tuple(str(party).rstrip("/") for party in value)
        return value

    @field_validator("frontend_api_url", "jwks_url")
    @classmethod
    def _check_optional_url(cls, value: str | None) -> str | None:
        return _url(value)

    @field_validator("clerk_api_url")
    @classmethod
    def _check_api_url(cls, value: str) -> str:
        _url(value)
        return value.rstrip("/")

    @field_validator("grpc_addr", "webhook_addr", "metrics_addr")
    @classmethod
    def _check_addr(cls, value: str) -> str:
        return _addr(value)

    @field_validator("webhook_metrics_addr")
    @classmethod
    def _check_optional_addr(cls, value: str | None) -> str | None:
        return None if value is None else _addr(value)

    @field_validator("webhook_path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("jwt_key", mode="before")
    @classmethod
    def _check_jwt_key(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        value = value.replace("\\n", "\n")
        try:
            key = load_pem_public_key(value.encode())
        except (ValueError, TypeError):
            raise ValueError("must be a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
        if not isinstance(key, RSAPublicKey):
            raise ValueError("must be an RSA public key (Clerk signs with RS256)")
        return value

    @field_validator("log_level", "log_rpcs", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("env", mode="before")
    @classmethod
    def _lower_env(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        if isinstance(value, str) and value.lower() == "auto":
            return available_cpus()
        return value

    @field_validator("jit_sync", "ext_authz", "reflection", "accept_pending_sessions", mode="before")
    @classmethod
    def _check_switch(cls, value: object) -> object:
        return _switch(value)

    @field_validator("tls_cert", "tls_key", "tls_client_ca", "callers_file")
    @classmethod
    def _check_file(cls, value: Path | None) -> Path | None:
        return _file(value)

    # --- derived values ---------------------------------------------------------
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

    @property
    def production(self) -> bool:
        return self.env == "production"

    # --- what each command needs ------------------------------------------------
    def _database_problems(self) -> list[str]:
        if self.mongodb_uri is not None:
            return []
        if self.production:
            return ["MONGODB_URI is required with AUTHSVC_ENV=production (the embedded database is for development)"]
        if importlib.util.find_spec("secantus") is None:
            return [
                "MONGODB_URI is unset and the embedded database is not installed: "
                "set MONGODB_URI, or install the extra with: pip install 'authsvc[embedded]'"
            ]
        return []

    def check_webhook(self) -> None:
        """Raise :class:`SettingsError` (every problem) unless the sidecar can start."""
        problems = []
        if not self.webhook_secrets:
            problems.append("CLERK_WEBHOOK_SECRET is required by the webhook sidecar (whsec_...)")
        problems += self._database_problems()
        if problems:
            raise SettingsError(problems)

    def check_grpc(self) -> None:
        """Raise :class:`SettingsError` (every problem) unless the gRPC service can start."""
        problems = []
        if not self.frontend_api_url and not self.jwt_key:
            problems.append("CLERK_FRONTEND_API_URL (or CLERK_JWT_KEY) is required by the gRPC service")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("AUTHSVC_TLS_CERT and AUTHSVC_TLS_KEY must be set together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("AUTHSVC_TLS_CLIENT_CA needs AUTHSVC_TLS_CERT and AUTHSVC_TLS_KEY")
        problems += self._callers_problems()
        problems += self._database_problems()
        if problems:
            raise SettingsError(problems)

    def _callers_problems(self) -> list[str]:
        if self.callers_file is None:
            return []
        from service.callerfile import read_policy  # grpc's import stays out of --help
        from service.callers import CallersFileError

        try:
            read_policy(self.callers_file, mtls=self.tls_client_ca is not None)
        except CallersFileError as exc:
            return [f"AUTHSVC_CALLERS_FILE {exc}"]
        return []

    def check_dev(self) -> None:
        """Raise :class:`SettingsError` unless ``authsvc dev`` may run (never in production)."""
        if self.production:
            raise SettingsError(["authsvc dev refuses to run with AUTHSVC_ENV=production"])
        problems = self._callers_problems() + self._database_problems()
        if problems:
            raise SettingsError(problems)

    def check_sync(self) -> None:
        """Raise :class:`SettingsError` (every problem) unless ``authsvc sync`` can run."""
        problems = []
        if not self.clerk_secret_key:
            problems.append("CLERK_SECRET_KEY is required by authsvc sync (sk_live_... or sk_test_...)")
        problems += self._database_problems()
        if problems:
            raise SettingsError(problems)


ALIASES: dict[str, str] = {name: str(field.alias) for name, field in Settings.model_fields.items()}


def describe(names: Iterable[str]) -> list[tuple[str, str, str]]:
    """``(variable, default, description)`` of the named fields, for ``--help``."""
    rows = []
    for name in names:
        field = Settings.model_fields[name]
        default = field.default
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "shown" in extra:  # a switch the contract writes as true/false rather than on/off
            shown = str(extra["shown"])
        elif isinstance(default, bool):
            shown = "on" if default else "off"
        elif isinstance(default, float):
            shown = f"{default:g}"
        else:
            shown = "unset" if default in (None, ()) else str(default)
        rows.append((ALIASES[name], shown, field.description or ""))
    return rows


def _problem(error: Any) -> str:
    name = str(error["loc"][0]) if error["loc"] else "settings"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    if error["type"] in ("literal_error", "int_parsing", "float_parsing", "greater_than_equal", "less_than_equal"):
        return f"{name} {message[:1].lower()}{message[1:]}, got {value!r}"
    return f"{name} {message}"


def load(
    environ: Mapping[str, str] | None = None,
    dotenv: Path | None = Path(".env"),
    *,
    check: Callable[[Settings], None] | None = None,
) -> Settings:
    """Read settings from ``environ`` (default: the process environment) over ``.env``.

    Empty values count as unset. ``check`` (e.g. ``Settings.check_grpc``) adds
    what a command requires. Raises :class:`SettingsError` listing every
    problem at once: the invalid values and, over the valid ones, what the
    command still lacks.
    """
    values: dict[str, str] = {}
    if dotenv is not None and dotenv.is_file():
        values.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
    values.update(os.environ if environ is None else environ)
    known = set(ALIASES.values())
    cleaned = {k: v.strip() for k, v in values.items() if k in known and v.strip()}
    problems: list[str] = []
    invalid: set[str] = set()
    try:
        settings = Settings.model_validate(cleaned)
    except ValidationError as exc:
        problems = [_problem(error) for error in exc.errors()]
        invalid = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
        try:
            settings = Settings.model_validate({k: v for k, v in cleaned.items() if k not in invalid})
        except ValidationError:
            raise SettingsError(problems) from None
    if check is not None:
        try:
            check(settings)
        except SettingsError as exc:
            # A requirement on a variable already reported invalid would say the same thing twice.
            problems += [p for p in exc.problems if not any(name in p for name in invalid)]
    if problems:
        raise SettingsError(problems)
    return settings
