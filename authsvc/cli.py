"""The ``authsvc`` command line: the only place that reads the environment."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable, Sequence

from service import logs
from service.settings import SettingsError, load
from service.startup import StartupError

EXIT_CONFIG = 2


def _run(coro_factory: Callable[[], Awaitable[None]]) -> int:
    async def runner() -> None:
        await coro_factory()

    try:
        asyncio.run(runner())
    except StartupError as exc:
        print(f"authsvc: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="authsvc", description="Clerk identity for internal services.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("grpc", help="serve the gRPC API on AUTHSVC_GRPC_ADDR")
    sub.add_parser("webhook", help="serve the Clerk webhook sidecar on AUTHSVC_WEBHOOK_ADDR")
    sub.add_parser("dev", help="both, on the embedded database, with a development issuer and secret")
    token = sub.add_parser("dev-token", help="print a session JWT signed by the development issuer")
    token.add_argument("subject", help="the Clerk user id (sub), e.g. user_1")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    hook = sub.add_parser("dev-webhook", help="send one signed Clerk event to the running dev sidecar")
    hook.add_argument("event", choices=["user.created", "user.updated", "user.deleted", "session.created"])
    hook.add_argument("--id", required=True, dest="user_id", help="the Clerk user id, e.g. user_1")
    hook.add_argument("--role", choices=["superadmin", "admin", "staff"])
    hook.add_argument("--email")
    hook.add_argument("--first-name")
    hook.add_argument("--last-name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load()
        if args.command == "webhook":
            settings.check_webhook()
        elif args.command == "grpc":
            settings.check_grpc()
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"authsvc: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(settings.log_level)

    with contextlib.suppress(BrokenPipeError):
        if args.command == "webhook":
            from webhook.main import run_webhook

            return _run(lambda: run_webhook(settings))
        if args.command == "grpc":
            from service.app import run_grpc

            return _run(lambda: run_grpc(settings))
        # The development tools are only loaded when asked for.
        from authsvc.dev import events, run

        if args.command == "dev":
            return _run(lambda: run.run(settings))
        if args.command == "dev-token":
            return run.print_token(settings, args.subject, ttl_s=args.ttl)
        if args.command == "dev-webhook":
            event = events.clerk_event(
                args.event,
                args.user_id,
                role=args.role,
                email=args.email,
                first_name=args.first_name,
                last_name=args.last_name,
            )
            return asyncio.run(events.send_event(settings, event))
    return 0
