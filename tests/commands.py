"""Counting the commands a real client sends (pymongo's command monitoring), to test how many a path costs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from pymongo import WriteConcern, monitoring

from service.database import make_client
from service.embedded import EmbeddedMongo
from service.users import UserStore


class Commands(monitoring.CommandListener):
    """The commands a client sent, as (command, collection)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.sent.append((event.command_name, str(event.command.get(event.command_name))))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def count(self, command: str, collection: str) -> int:
        return self.sent.count((command, collection))


@contextlib.asynccontextmanager
async def watched_store(mongo: EmbeddedMongo, db: str) -> AsyncIterator[tuple[UserStore, Commands]]:
    """A store on database ``db`` whose client's commands are counted (from after its indexes)."""
    commands = Commands()
    client = make_client(mongo.uri, event_listeners=[commands])
    try:
        store = UserStore(client[db], write_concern=WriteConcern(j=True))
        await store.ensure_indexes()
        commands.sent.clear()
        yield store, commands
    finally:
        await client.close()
