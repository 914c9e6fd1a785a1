"""``authsvc sync``: its ``--help`` (the settings it reads) and its exit codes (0 complete, 1 incomplete, 2 key).

The reconcile itself is :mod:`service.sync`, imported only when the command runs.
"""

from __future__ import annotations

import asyncio

from service.command import DATABASE, EXIT_CONFIG, Command, prepare
from service.settings import Settings


async def _sync(settings: Settings) -> None:
    from service.sync import run_sync

    code = await run_sync(settings)
    if code:
        raise SystemExit(code)


SYNC = Command(
    name="sync",
    brief="backfill and reconcile users from Clerk's Backend API",
    summary=(
        "List every Clerk user (GET /v1/users, oldest first) and write each through the same conditional write "
        "as a user.updated webhook; print a progress bar on a terminal, JSON progress lines otherwise, and one "
        "summary line. Exit 0 complete, 1 Clerk kept failing (says where it stopped), 2 key missing or refused."
    ),
    reads=(*DATABASE, "clerk_secret_key", "clerk_api_url", "delete_mode"),
    run=_sync,
    check=Settings.check_sync,
    requires="CLERK_SECRET_KEY; MONGODB_URI when AUTHSVC_ENV=production",
)


def main(*, dry_run: bool = False, prune: bool = False) -> int:
    """Load the settings (every problem at once, exit 2), set up logging, run the sync; its exit code."""
    settings = prepare(SYNC)
    if settings is None:
        return EXIT_CONFIG
    from service.sync import run_sync

    try:
        return asyncio.run(run_sync(settings, dry_run=dry_run, prune=prune))
    except KeyboardInterrupt:
        return 130
