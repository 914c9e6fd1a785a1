"""Running one command of a process: its ``--help`` (the settings it reads), settings, exit codes.

Each package names its own commands (``GRPC`` here, ``webhook.command.WEBHOOK``,
``authsvc.dev.command.DEV``); ``python -m service``, ``python -m webhook``
and the ``authsvc`` console script all run them through :func:`execute`. A
command's ``run`` imports its process lazily, so ``--help`` and the small
development commands stay quick.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import textwrap
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from service import logs
from service.settings import Settings, SettingsError, describe, load
from service.startup import StartupError

EXIT_CONFIG = 2

# Read by every command that opens the database.
DATABASE = ("mongodb_uri", "mongodb_db", "data_dir", "env", "log_level")


@dataclass(frozen=True)
class Command:
    """A long-running command: what ``--help`` says about it, what it requires, how it runs."""

    name: str
    brief: str  # one line for the list of commands
    summary: str  # the description of its --help
    reads: tuple[str, ...]  # Settings field names, in the order --help lists them
    run: Callable[[Settings], Awaitable[None]]
    check: Callable[[Settings], None] | None = None  # raises SettingsError with every missing requirement
    requires: str = ""  # one line for --help, e.g. "CLERK_WEBHOOK_SECRET"
    service_name: str = ""  # OTEL_SERVICE_NAME's default when it traces; empty: it does not trace

    def epilog(self) -> str:
        """The table of the settings this command reads, for ``--help``."""
        rows = [("variable", "default", "meaning"), *describe(self.reads)]
        width = [max(len(row[i]) for row in rows) for i in range(2)]
        lines = ["settings (environment variables; also read from .env in the working directory):"]
        lines += [f"  {name:<{width[0]}}  {default:<{width[1]}}  {meaning}".rstrip() for name, default, meaning in rows]
        if self.service_name:
            tracing = (
                "tracing: OpenTelemetry's own variables, from the environment (not .env): with "
                "OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) set, traces go over OTLP "
                "(OTEL_EXPORTER_OTLP_PROTOCOL grpc or http/protobuf); also OTEL_SERVICE_NAME (default "
                f"{self.service_name}), OTEL_TRACES_SAMPLER, OTEL_RESOURCE_ATTRIBUTES, OTEL_SDK_DISABLED."
            )
            lines += ["", *textwrap.wrap(tracing, 100, break_on_hyphens=False)]
        if self.requires:
            lines += ["", f"required: {self.requires}"]
        lines += ["", "A missing or invalid setting exits with status 2, one line per problem."]
        return "\n".join(lines)

    def configure(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Give ``parser`` this command's description and settings table."""
        parser.description = self.summary
        parser.epilog = self.epilog()
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        return parser


def authsvc_version() -> str:
    """The installed distribution's version (``pyproject.toml``)."""
    try:
        return version("authsvc")
    except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
        return "unknown"


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"authsvc {authsvc_version()}")


def run_until_done(factory: Callable[[], Awaitable[None]]) -> int:
    """Run ``factory()`` in a fresh event loop: 0 when done or interrupted, 2 on a :class:`StartupError`."""

    async def runner() -> None:
        await factory()

    try:
        asyncio.run(runner())
    except StartupError as exc:
        print(f"authsvc: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    return 0


def prepare(command: Command) -> Settings | None:
    """The settings of ``command`` with logging set up; None after printing every problem (exit 2).

    A command that traces also reports what tracing lacks (:func:`service.tracing.problems`).
    """
    problems: list[str] = []
    if command.service_name:
        from service import tracing  # the SDK is imported only when an endpoint is set

        problems = tracing.problems()
    settings: Settings | None = None
    try:
        settings = load(check=command.check)
    except SettingsError as exc:
        problems = exc.problems + problems
    if problems or settings is None:
        for problem in problems:
            print(f"authsvc: {problem}", file=sys.stderr)
        return None
    logs.setup(settings.log_level)
    return settings


def execute(command: Command) -> int:
    """Load the settings (every problem at once, exit 2), set up logging, run ``command``."""
    settings = prepare(command)
    if settings is None:
        return EXIT_CONFIG
    with contextlib.suppress(BrokenPipeError):
        return run_until_done(lambda: command.run(settings))
    return 0


def main(command: Command, argv: Sequence[str] | None = None, *, prog: str) -> int:
    """``python -m PACKAGE``: parse ``--help``/``--version``, then :func:`execute`."""
    parser = command.configure(argparse.ArgumentParser(prog=prog))
    add_version(parser)
    parser.parse_args(argv)
    return execute(command)


async def _serve_grpc(settings: Settings) -> None:
    from service.app import run_grpc
    from service.workers import serve

    await serve("grpc", run_grpc, settings)


GRPC = Command(
    name="grpc",
    brief="serve the gRPC API on AUTHSVC_GRPC_ADDR",
    summary="Serve the gRPC API (VerifyToken, GetUser, SetRole, health, reflection) on AUTHSVC_GRPC_ADDR.",
    reads=(
        *DATABASE,
        "frontend_api_url",
        "jwks_url",
        "jwt_key",
        "authorized_parties",
        "jwt_audience",
        "clock_skew_s",
        "clerk_secret_key",
        "clerk_api_url",
        "jit_sync",
        "grpc_addr",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "drain_s",
        "workers",
        "metrics_addr",
        "ext_authz",
        "stale_s",
        "max_connection_age_s",
        "accept_pending_sessions",
        "setrole_max_factor_age_min",
        "callers_file",
        "reflection",
        "log_rpcs",
    ),
    run=_serve_grpc,
    check=Settings.check_grpc,
    requires="CLERK_FRONTEND_API_URL (or CLERK_JWT_KEY); MONGODB_URI when AUTHSVC_ENV=production",
    service_name="authsvc-grpc",
)
