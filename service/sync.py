"""Reconcile ``users`` from Clerk's Backend API: ``authsvc sync`` and the sidecar's periodic repair.

Every listed user goes through the same conditional write as a
``user.updated`` webhook (:class:`service.users.MirrorWrite`), a page at a
time: one read of the page's stored users, then one unordered bulk write of
the users that changed (:meth:`UserStore.upsert_page_from_clerk`), so an
up-to-date user costs no write. The next page is fetched from Clerk while
the current one is written. ``--prune`` runs only after a
complete listing, only on users that were in MongoDB before the run started,
and only once Clerk confirms each one is gone (``GET /v1/users/{id}`` is 404):
offset pages shift when a user is deleted during the listing, so "not listed"
alone is not proof.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Never, TextIO

from tqdm import tqdm

from service.clerkapi import ClerkBackend, ClerkUser
from service.clerkuser import profile_of
from service.errors import AuthError, ClerkKeyRefused, ClerkUserNotFound, InvalidEvent
from service.logs import fields
from service.metrics import SYNC_USERS
from service.settings import Settings
from service.startup import StartupError, user_store
from service.users import Outcome, UserProfile, UserStore, compare

log = logging.getLogger(__name__)

PAGE_SIZE = 500
EXIT_OK, EXIT_INCOMPLETE, EXIT_CONFIG = 0, 1, 2


@dataclass
class Summary:
    """What a sync saw and did (or, with ``--dry-run``, would do)."""

    total: int = 0  # GET /v1/users/count at the start
    listed: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    stale: int = 0
    pruned: int = 0
    invalid: int = 0  # user objects that did not validate (logged, never written)

    def line(self) -> str:
        text = (
            f"listed {self.listed}, created {self.created}, updated {self.updated}, "
            f"unchanged {self.unchanged}, stale {self.stale}, pruned {self.pruned}"
        )
        return f"{text}, invalid {self.invalid}" if self.invalid else text

    def add(self, outcome: Outcome) -> None:
        name = outcome.value
        setattr(self, name, getattr(self, name) + 1)
        SYNC_USERS.labels(outcome=name).inc()


class SyncIncomplete(Exception):
    """Clerk (or the database) kept failing; ``str()`` says where the run stopped. Nothing was pruned."""

    def __init__(self, summary: Summary, where: str, cause: AuthError) -> None:
        super().__init__(f"stopped {where} (listed {summary.listed} of {summary.total}): {cause}; nothing pruned")
        self.summary = summary


Progress = Callable[[Summary], None]
PageHook = Callable[[], Awaitable[None]]


async def reconcile(
    clerk: ClerkBackend,
    store: UserStore,
    *,
    dry_run: bool = False,
    prune: bool = False,
    via: str = "sync",
    total: int | None = None,
    page_size: int = PAGE_SIZE,
    progress: Progress | None = None,
    on_page: PageHook | None = None,
) -> Summary:
    """List every Clerk user (oldest first) and write each through the one conditional write.

    Raises :class:`ClerkKeyRefused` when the key is refused and
    :class:`SyncIncomplete` when Clerk or the database kept failing.
    ``on_page`` runs after every page (the periodic repair renews its lease there).
    """
    summary = Summary()
    summary.total = await clerk.count_users() if total is None else total
    before = await store.live_ids() if prune else set()
    listed: set[str] = set()
    offset = 0
    page = await _listed(clerk.list_users(offset=offset, limit=page_size), summary, offset)
    while True:
        # The next page is asked for while this one is written: at most one listing request in flight.
        following = None
        if len(page) >= page_size:
            following = asyncio.create_task(clerk.list_users(offset=offset + len(page), limit=page_size))
        try:
            try:
                await _apply_page(store, page, listed, summary, dry_run=dry_run, via=via)
            except AuthError as exc:
                raise SyncIncomplete(summary, f"at offset {offset}", exc) from exc
            if progress is not None:
                progress(summary)
            if on_page is not None:
                await on_page()
        except BaseException:
            if following is not None:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
            raise
        if following is None:
            break
        offset += len(page)
        page = await _listed(following, summary, offset)
    if prune:
        await _prune(clerk, store, sorted(before - listed), summary, dry_run=dry_run)
        if progress is not None:
            progress(summary)
    return summary


async def _listed(page: Awaitable[list[ClerkUser]], summary: Summary, offset: int) -> list[ClerkUser]:
    """One page of the listing; a failure that is not the key's stops the run as incomplete."""
    try:
        return await page
    except ClerkKeyRefused:
        raise
    except AuthError as exc:
        raise SyncIncomplete(summary, f"at offset {offset}", exc) from exc


async def _apply_page(
    store: UserStore, page: Sequence[object], listed: set[str], summary: Summary, *, dry_run: bool, via: str
) -> None:
    profiles: list[UserProfile] = []
    for user in page:
        try:
            profile = profile_of(user)
        except InvalidEvent as exc:
            user_id = user.get("id") if isinstance(user, dict) else None
            if isinstance(user_id, str):
                listed.add(user_id)  # Clerk has it: never prune it
            summary.invalid += 1
            SYNC_USERS.labels(outcome="invalid").inc()
            log.warning("clerk user skipped", extra=fields(externalId=ascii(user_id)[:80], error=str(exc)))
            continue
        if profile.external_id not in listed:  # a page that shifted may repeat a user: count it once
            listed.add(profile.external_id)
            profiles.append(profile)
    summary.listed += len(profiles)
    stored = await store.mirrored([p.external_id for p in profiles])
    if dry_run:
        for profile in profiles:
            summary.add(compare(profile, stored.get(profile.external_id)))
        return
    for outcome in await store.upsert_page_from_clerk(profiles, stored, via=via):
        summary.add(outcome)


async def _prune(
    clerk: ClerkBackend, store: UserStore, candidates: list[str], summary: Summary, *, dry_run: bool
) -> None:
    for external_id in candidates:
        try:
            await clerk.get_user(external_id)
            continue  # still in Clerk: the listing missed it (a page shifted under a deletion)
        except ClerkUserNotFound:
            pass
        except ClerkKeyRefused:
            raise
        except AuthError as exc:
            raise SyncIncomplete(summary, "while confirming users to prune", exc) from exc
        if dry_run or await store.delete(external_id) is Outcome.APPLIED:
            summary.pruned += 1
            SYNC_USERS.labels(outcome="pruned").inc()


# --- authsvc sync ------------------------------------------------------------------------
class _Reporter:
    """A tqdm bar on a terminal; JSON progress lines otherwise."""

    def __init__(self, out: TextIO, total: int) -> None:
        self._out = out
        self._bar: tqdm[Never] | None = None
        if out.isatty():
            self._bar = tqdm(total=total, unit="user", file=out, dynamic_ncols=True, desc="authsvc sync")

    def __call__(self, summary: Summary) -> None:
        if self._bar is not None:
            self._bar.total = max(self._bar.total or 0, summary.listed)
            self._bar.update(summary.listed - self._bar.n)
            self._bar.set_postfix(created=summary.created, updated=summary.updated, stale=summary.stale)
        else:
            print(json.dumps({"event": "sync progress", **asdict(summary)}), file=self._out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_sync(
    settings: Settings,
    *,
    dry_run: bool = False,
    prune: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    clerk: ClerkBackend | None = None,
) -> int:
    """``authsvc sync``: the exit code. 0 complete; 1 Clerk kept failing; 2 no key, or the key refused.

    A 2 is one line on ``err`` and nothing else; a 1 prints the partial
    summary on ``out`` and where it stopped on ``err``.
    """
    if not settings.clerk_secret_key:
        print("authsvc: CLERK_SECRET_KEY is required by authsvc sync (sk_live_... or sk_test_...)", file=err)
        return EXIT_CONFIG
    client = clerk or ClerkBackend(settings.clerk_api_url, settings.clerk_secret_key)
    try:
        # The key is tried before anything else happens, so a refused key is the whole output.
        total = await client.count_users()
        async with user_store(settings) as store:
            reporter = _Reporter(out, total)
            try:
                summary = await reconcile(client, store, dry_run=dry_run, prune=prune, total=total, progress=reporter)
            finally:
                reporter.close()
    except ClerkKeyRefused as exc:
        print(f"authsvc: {exc}", file=err)
        return EXIT_CONFIG
    except SyncIncomplete as exc:
        print(exc.summary.line(), file=out)
        print(f"authsvc sync: {exc}", file=err)
        return EXIT_INCOMPLETE
    except AuthError as exc:  # the count itself failed
        print(f"authsvc sync: stopped before listing: {exc}", file=err)
        return EXIT_INCOMPLETE
    except StartupError as exc:
        print(f"authsvc: {exc}", file=err)
        return EXIT_CONFIG
    finally:
        if clerk is None:
            await client.close()
    print(summary.line(), file=out)
    return EXIT_OK
