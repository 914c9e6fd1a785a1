"""The dedupe ledger's writer: the entries of concurrent deliveries go to ``webhook_events`` together."""

from __future__ import annotations

import asyncio
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

Document = dict[str, Any]
DUPLICATE_KEY = 11000  # MongoDB's error code for a unique index collision


class LedgerWriter:
    """Ledger entries of concurrent deliveries, written together: one unordered ``insert_many`` at a time.

    An entry that arrives while a write is under way waits for it, then goes
    in the next one with every other entry that arrived meanwhile (a group
    commit: no timer, so a lone delivery waits for nothing). Each delivery
    learns its own fate from its index in the write: recorded, or a
    duplicate (code 11000: its svix-id is in the ledger, or earlier in the
    same write). Any other failure (the driver's error, translated by the
    caller) fails every delivery of that write.
    """

    def __init__(self, ledger: AsyncCollection[Document]) -> None:
        self._ledger = ledger
        self._waiting: list[tuple[Document, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, entry: Document) -> bool:
        recorded: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((entry, recorded))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all())
        return await recorded

    async def _write_all(self) -> None:
        batch: list[tuple[Document, asyncio.Future[bool]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                await self._write([entry for entry, _ in batch], [recorded for _, recorded in batch])
        except asyncio.CancelledError:  # the loop is closing: nobody is left waiting for an answer
            for _, recorded in batch + self._waiting:
                recorded.cancel()
            raise
        finally:
            self._writer = None

    async def _write(self, entries: list[Document], told: list[asyncio.Future[bool]]) -> None:
        duplicates: set[int] = set()
        try:
            try:
                await self._ledger.insert_many(entries, ordered=False)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if exc.details.get("writeConcernErrors") or any(e.get("code") != DUPLICATE_KEY for e in errors):
                    raise
                duplicates = {e["index"] for e in errors}
        except Exception as exc:
            for recorded in told:
                if not recorded.done():
                    recorded.set_exception(exc)
            return
        for index, recorded in enumerate(told):
            if not recorded.done():
                recorded.set_result(index not in duplicates)
