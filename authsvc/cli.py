"""The ``authsvc`` console script: dispatch only.

``grpc`` and ``webhook`` are the commands of ``python -m service`` and
``python -m webhook``; ``dev`` and the ``dev-*`` helpers load the development
tooling (``authsvc.dev``) only when asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from authsvc.dev.command import DEV
from service.command import EXIT_CONFIG, GRPC, Command, add_version, execute
from service.settings import SettingsError, load
from service.synccommand import SYNC
from service.synccommand import main as sync_main
from webhook.command import WEBHOOK

COMMANDS: tuple[Command, ...] = (GRPC, WEBHOOK, DEV)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="authsvc", description="Clerk identity for internal services.")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.configure(sub.add_parser(command.name, help=command.brief))
    token = sub.add_parser("dev-token", help="print a session JWT signed by the development issuer")
    token.add_argument("subject", help="the Clerk user id (sub), e.g. user_1")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    hook = sub.add_parser(
        "dev-webhook",
        help="send one signed Clerk event to the running dev sidecar",
        description=(
            "Send one signed Clerk event to the running `authsvc dev` sidecar. user.updated sends what you give "
            "on top of the user the dev database holds (read with GetUser) and says what it keeps."
        ),
    )
    hook.add_argument("event", choices=["user.created", "user.updated", "user.deleted", "session.created"])
    hook.add_argument("--id", required=True, dest="user_id", help="the Clerk user id, e.g. user_1")
    hook.add_argument("--role", choices=["superadmin", "admin", "staff"])
    hook.add_argument("--email")
    hook.add_argument("--first-name")
    hook.add_argument("--last-name")
    sync = SYNC.configure(sub.add_parser(SYNC.name, help=SYNC.brief))
    sync.add_argument("--dry-run", action="store_true", help="read and compare, write nothing, print the summary")
    sync.add_argument("--prune", action="store_true", help="after a complete listing, delete users Clerk no longer has")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for command in COMMANDS:
        if args.command == command.name:
            return execute(command)
    if args.command == SYNC.name:
        return sync_main(dry_run=args.dry_run, prune=args.prune)
    try:
        settings = load()
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"authsvc: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    from authsvc.dev import events, run

    if args.command == "dev-token":
        return run.print_token(settings, args.subject, ttl_s=args.ttl)
    changes = events.Changes(role=args.role, email=args.email, first_name=args.first_name, last_name=args.last_name)
    return asyncio.run(events.send_dev_event(settings, args.event, args.user_id, changes))
