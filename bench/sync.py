"""``python -m bench sync``: authsvc sync of N users from a local fake Clerk, against baselines of the same run.

The fake Clerk Backend API (``tests/fakeclerk.py``) runs in its own process
with N real-shaped users; the reconcile runs here, exactly as ``authsvc sync``
runs it (same client, same engine, same conditional write, durable write
concern), over a private embedded database. Two interleaved comparisons
(A B B A ...), each run timed on its own:

- **backfill** (the sync into an empty database: every user created) against
  **raw bulk insert** (``insert_many(ordered=False)`` of the same mapped
  documents, 500 a batch, same durable write concern, into an empty
  ``users`` collection with the same indexes): every run in a fresh database;
- **re-run** (the sync again with nothing changed: every user unchanged, no
  write) against **listing only** (the same pages through the same client,
  fetched and discarded).

Each ratio is the median over the interleaved pairs, with its spread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bench.common import CTX, READY_TIMEOUT_S, Spread, abba, pair_ratios, private_mongo, ratio_line, workdir
from service.clerkapi import ClerkBackend
from service.clerkuser import profile_of
from service.database import durable_write_concern, make_client
from service.sync import PAGE_SIZE, Summary, reconcile
from service.users import MirrorWrite, UserStore

SECRET = "sk_test_bench"
BACKFILL, INSERT, RERUN, LISTING = "backfill", "raw bulk insert", "re-run, nothing changed", "listing only"
TARGETS = {(BACKFILL, INSERT): 0.5, (RERUN, LISTING): 0.5}


async def run(*, users: int = 10_000, pairs: int = 4) -> list[str]:
    """Run the interleaved phases; return the lines to print."""
    logging.disable(logging.WARNING)  # unknown roles in the data set are logged per user otherwise
    ports, stop = CTX.Queue(), CTX.Queue()
    from tests.fakeclerk import serve_in_child

    fake = CTX.Process(
        target=serve_in_child, args=(ports, stop), kwargs=dict(secret=SECRET, users=users, prefix="user_bench_")
    )
    fake.start()
    try:
        loop = asyncio.get_running_loop()
        port = await loop.run_in_executor(None, ports.get, True, READY_TIMEOUT_S)
        clerk = ClerkBackend(f"http://127.0.0.1:{port}", SECRET)
        try:
            with workdir("authsvc-bench-sync-") as directory:
                async with private_mongo(directory) as mongo:
                    rates, summaries = await _phases(clerk, mongo.uri, users, pairs)
        finally:
            await clerk.close()
    finally:
        stop.put("stop")
        fake.join(10)
        if fake.is_alive():
            fake.terminate()
        logging.disable(logging.NOTSET)
    return _report(rates, summaries, users, pairs)


async def _phases(clerk: ClerkBackend, uri: str, users: int, pairs: int) -> tuple[dict[str, Spread], dict[str, str]]:
    client = make_client(uri)
    rates: dict[str, Spread] = {name: Spread() for name in (BACKFILL, INSERT, RERUN, LISTING)}
    summaries: dict[str, str] = {}
    fresh = iter(range(1_000_000))
    try:
        concern = await durable_write_concern(client)

        async def new_store() -> UserStore:
            store = UserStore(client[f"bench{next(fresh)}"], write_concern=concern)
            await store.ensure_indexes()
            return store

        async def list_all() -> list[dict[str, Any]]:
            listed: list[dict[str, Any]] = []
            while True:
                page = await clerk.list_users(offset=len(listed), limit=PAGE_SIZE)
                listed += page
                if len(page) < PAGE_SIZE:
                    return listed

        documents = [MirrorWrite.of(profile_of(user)).insert() for user in await list_all()]

        async def timed(name: str, work: Any) -> Any:
            began = time.perf_counter()
            result = await work
            rates[name].values.append(users / (time.perf_counter() - began))
            if isinstance(result, Summary):
                summaries[name] = result.line()
            return result

        async def backfill() -> UserStore:
            store = await new_store()
            await timed(BACKFILL, reconcile(clerk, store))
            return store

        async def bulk_insert() -> None:
            collection = (await new_store()).users

            async def insert_all() -> None:
                for start in range(0, len(documents), PAGE_SIZE):
                    await collection.insert_many(
                        [dict(doc) for doc in documents[start : start + PAGE_SIZE]], ordered=False
                    )

            await timed(INSERT, insert_all())

        synced: UserStore | None = None
        for side in abba(pairs):
            if side == 0:
                synced = await backfill()
            else:
                await bulk_insert()
        assert synced is not None
        for side in abba(pairs):
            await (timed(RERUN, reconcile(clerk, synced)) if side == 0 else timed(LISTING, list_all()))
        return rates, summaries
    finally:
        await client.close()


def _report(rates: dict[str, Spread], summaries: dict[str, str], users: int, pairs: int) -> list[str]:
    lines = [
        f"sync: {users:,} users in a fake Clerk (own process), pages of {PAGE_SIZE}, "
        f"{pairs} interleaved pairs (A B B A ...) per comparison",
        "",
    ]
    width = max(len(name) for name in rates)
    lines.append(f"{'sync'.ljust(width)}  users/s: median (min-max, n)      summary")
    for name, spread in rates.items():
        lines.append(f"{name.ljust(width)}  {spread.text().ljust(32)} {summaries.get(name, '')}".rstrip())
    lines += ["", "ratios (median of the interleaved pairs, min-max):"]
    for (top, bottom), target in TARGETS.items():
        ratios = pair_ratios(rates[top].values, rates[bottom].values)
        lines.append(ratio_line(f"{top} / {bottom}", ratios, target, width=36))
    return lines
