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
from webhook.events import SESSION_END_EVENTS

COMMANDS: tuple[Command, ...] = (GRPC, WEBHOOK, DEV)


def factor_ages(value: str) -> list[int]:
    """``--fva FIRST,SECOND``: two integers, minutes since each factor was verified (-1: never)."""
    try:
        first, second = (int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two integers FIRST,SECOND, got {value!r}") from None
    return [first, second]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="authsvc", description="Clerk identity for internal services.")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.configure(sub.add_parser(command.name, help=command.brief))
    token = sub.add_parser("dev-token", help="print a session JWT signed by the development issuer")
    token.add_argument("subject", help="the Clerk user id (sub), e.g. user_1")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.add_argument("--sid", help="the session id (sid); default: a new random one")
    token.add_argument("--act", metavar="ACTOR_ID", help="an impersonated session: act.sub, who impersonates SUBJECT")
    token.add_argument("--pending", action="store_true", help="a pending session (sts: pending)")
    token.add_argument(
        "--fva",
        type=factor_ages,
        metavar="FIRST,SECOND",
        help="factor verification ages in minutes (-1: never), e.g. 0,0 for SetRole's step-up",
    )
    hook = sub.add_parser(
        "dev-webhook",
        help="send one signed Clerk event to the running dev sidecar",
        description=(
            "Send one signed Clerk event to the running `authsvc dev` sidecar. user.updated sends what you give "
            "on top of the user the dev database holds (read with GetUser) and says what it keeps."
        ),
    )
    hook.add_argument(
        "event",
        choices=[
            "user.created",
            "user.updated",
            "user.deleted",
            "session.created",
            "session.revoked",
            "session.ended",
            "session.removed",
        ],
    )
    hook.add_argument("--id", required=True, dest="user_id", help="the Clerk user id, e.g. user_1")
    hook.add_argument("--sid", help="the session id (session.*); required by session.revoked/ended/removed")
    hook.add_argument("--role", choices=["superadmin", "admin", "staff"])
    hook.add_argument("--email")
    hook.add_argument("--first-name")
    hook.add_argument("--last-name")
    sync = SYNC.configure(sub.add_parser(SYNC.name, help=SYNC.brief))
    sync.add_argument("--dry-run", action="store_true", help="read and compare, write nothing, print the summary")
    sync.add_argument("--prune", action="store_true", help="after a complete listing, delete users Clerk no longer has")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "dev-webhook" and args.event in SESSION_END_EVENTS and not args.sid:
        parser.error(f"{args.event} needs --sid (the session whose tokens are to be refused)")
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
        claims = run.session_claims(actor=args.act, pending=args.pending, fva=args.fva)
        return run.print_token(settings, args.subject, ttl_s=args.ttl, session_id=args.sid, claims=claims)
    changes = events.Changes(role=args.role, email=args.email, first_name=args.first_name, last_name=args.last_name)
    return asyncio.run(events.send_dev_event(settings, args.event, args.user_id, changes, session_id=args.sid))
