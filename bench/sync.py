"""``python -m bench sync``: authsvc sync of N users from a local fake Clerk, against baselines of the same run.

The fake Clerk Backend API (``tests/fakeclerk.py``) runs in its own process
with N real-shaped users; the reconcile runs here, exactly as ``authsvc sync``
runs it (same client, same engine, same conditional write, durable write
concern), over a private embedded database. Phases, each timed on its own:

- **listing only**: every page through the client, nothing written: the floor of a sync;
- **backfill**: the sync into an empty database (every user created);
- **raw upserts**: a plain ``update_one(..., upsert=True)`` of the same fields per user,
  same write concern and concurrency, into a collection with the same unique index
  (what the webhook benchmark compares against);
- **raw bulk insert**: ``insert_many`` of the same documents, 500 a batch, same
  write concern and index: the floor of any write path that is not batched;
- **re-run**: the sync again with nothing changed (every user unchanged, no write).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from pymongo import ASCENDING

from bench.common import CTX, READY_TIMEOUT_S, private_mongo, workdir
from service.clerkapi import ClerkBackend
from service.clerkuser import profile_of
from service.database import durable_write_concern, make_client
from service.sync import WRITERS, reconcile
from service.users import UserStore

SECRET = "sk_test_bench"


@dataclass
class Phase:
    name: str
    users: int
    seconds: float
    detail: str = ""

    @property
    def rate(self) -> float:
        return self.users / self.seconds if self.seconds else 0.0


def _serve_fake_clerk(users: int, ports: Any, stop: Any) -> None:
    """Child process: the fake Clerk with ``users`` users, until ``stop`` gets anything."""
    from tests.fakeclerk import FakeClerk

    async def main() -> None:
        async with FakeClerk(SECRET) as fake:
            fake.add_users(users, prefix="user_bench_")
            ports.put(fake.port)
            await asyncio.get_running_loop().run_in_executor(None, stop.get)

    asyncio.run(main())


async def _timed(name: str, users: int, work: Any) -> tuple[Phase, Any]:
    began = time.perf_counter()
    result = await work
    return Phase(name, users, time.perf_counter() - began), result


async def run(*, users: int = 10_000) -> list[str]:
    """Run the phases; return the lines to print."""
    logging.disable(logging.WARNING)  # unknown roles in the data set are logged per user otherwise
    ports, stop = CTX.Queue(), CTX.Queue()
    fake = CTX.Process(target=_serve_fake_clerk, args=(users, ports, stop))
    fake.start()
    phases: list[Phase] = []
    try:
        loop = asyncio.get_running_loop()
        port = await loop.run_in_executor(None, ports.get, True, READY_TIMEOUT_S)
        clerk = ClerkBackend(f"http://127.0.0.1:{port}", SECRET)
        with workdir("authsvc-bench-sync-") as directory:
            async with private_mongo(directory) as mongo:
                phases = await _phases(clerk, mongo.uri, users)
        await clerk.close()
    finally:
        stop.put("stop")
        fake.join(10)
        if fake.is_alive():
            fake.terminate()
        logging.disable(logging.NOTSET)
    return _report(phases, users)


async def _phases(clerk: ClerkBackend, uri: str, users: int) -> list[Phase]:
    client = make_client(uri)
    try:
        concern = await durable_write_concern(client)
        store = UserStore(client["bench"], write_concern=concern)
        await store.ensure_indexes()

        async def list_all() -> list[dict[str, Any]]:
            listed: list[dict[str, Any]] = []
            while True:
                page = await clerk.list_users(offset=len(listed))
                listed += page
                if len(page) < 500:
                    return listed

        listing, listed = await _timed("sync: listing only", users, list_all())
        backfill, first = await _timed("sync: backfill", users, reconcile(clerk, store))
        backfill.detail = first.line()

        raw = client["bench"].get_collection("raw_users", write_concern=concern)
        await raw.create_index([("externalId", ASCENDING)], unique=True)
        profiles = [profile_of(user) for user in listed]
        gate = asyncio.Semaphore(WRITERS)

        async def upsert_one(index: int) -> None:
            p = profiles[index]
            fields = {"name": p.name, "email": p.email, "role": p.role.wire, "isActive": p.is_active,
                      "clerkUpdatedAt": p.clerk_updated_at}  # fmt: skip
            async with gate:
                await raw.update_one({"externalId": p.external_id}, {"$set": fields}, upsert=True)

        async def raw_upserts() -> None:
            await asyncio.gather(*(upsert_one(i) for i in range(len(profiles))))

        baseline, _ = await _timed("sync: raw upserts", users, raw_upserts())

        bulk = client["bench"].get_collection("bulk_users", write_concern=concern)
        await bulk.create_index([("externalId", ASCENDING)], unique=True)

        async def bulk_inserts() -> None:
            for start in range(0, len(profiles), 500):
                batch = profiles[start : start + 500]
                await bulk.insert_many([{"externalId": p.external_id, "name": p.name, "email": p.email,
                                         "role": p.role.wire, "isActive": p.is_active,
                                         "clerkUpdatedAt": p.clerk_updated_at} for p in batch])  # fmt: skip

        floor, _ = await _timed("sync: raw bulk insert", users, bulk_inserts())
        rerun, second = await _timed("sync: re-run, nothing changed", users, reconcile(clerk, store))
        rerun.detail = second.line()
        return [listing, backfill, baseline, floor, rerun]
    finally:
        await client.close()


def _report(phases: list[Phase], users: int) -> list[str]:
    by_name = {p.name: p for p in phases}
    lines = [f"sync: {users:,} users in a fake Clerk (own process), pages of 500, {WRITERS} writes in flight", ""]
    width = max(len(p.name) for p in phases)
    lines.append(f"{'benchmark'.ljust(width)}  {'users/s':>9}  {'seconds':>8}  summary")
    for p in phases:
        lines.append(f"{p.name.ljust(width)}  {p.rate:>9,.0f}  {p.seconds:>8.2f}  {p.detail}")

    def ratio(top: str, bottom: str) -> str:
        a, b = by_name.get(top), by_name.get(bottom)
        return f"{a.rate / b.rate:.2f}" if a and b and b.rate else "n/a"

    lines += [
        "",
        "ratios (same run):",
        f"  backfill / raw upserts        {ratio('sync: backfill', 'sync: raw upserts')}",
        f"  backfill / raw bulk insert    {ratio('sync: backfill', 'sync: raw bulk insert')}",
        f"  re-run / listing only         {ratio('sync: re-run, nothing changed', 'sync: listing only')}",
    ]
    return lines
