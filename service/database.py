"""Opening MongoDB: the configured URI, or the embedded server when it is unset.

Timeouts are short so that a dead database is answered (503 / UNAVAILABLE)
within seconds instead of after the driver's 30 s server-selection default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pymongo import AsyncMongoClient, WriteConcern
from pymongo.asynchronous.database import AsyncDatabase

from service.embedded import EmbeddedMongo
from service.logs import fields
from service.settings import Settings

log = logging.getLogger(__name__)

Document = dict[str, Any]

CLIENT_OPTIONS: dict[str, Any] = {
    "serverSelectionTimeoutMS": 2000,
    "connectTimeoutMS": 2000,
    "socketTimeoutMS": 10000,
    "tz_aware": True,
    "appname": "authsvc",
}


def make_client(uri: str, **overrides: Any) -> AsyncMongoClient[Document]:
    """An ``AsyncMongoClient`` with authsvc's timeouts (callers may override)."""
    return AsyncMongoClient(uri, **{**CLIENT_OPTIONS, **overrides})


async def durable_write_concern(client: AsyncMongoClient[Document]) -> WriteConcern:
    """The write concern that makes a 2xx safe to answer.

    Journaled on a standalone server; majority (and journaled) on a replica set
    or through mongos. Decided once from the server's ``hello``.
    """
    hello = await client.admin.command("hello")
    if hello.get("setName") or hello.get("msg") == "isdbgrid":
        return WriteConcern(w="majority", j=True)
    return WriteConcern(j=True)


@dataclass
class Database:
    """An open database handle and, in development, the embedded server behind it."""

    client: AsyncMongoClient[Document]
    db: AsyncDatabase[Document]
    write_concern: WriteConcern
    embedded: EmbeddedMongo | None = None

    async def close(self) -> None:
        await self.client.close()
        if self.embedded is not None:
            self.embedded.stop()


async def open_database(settings: Settings) -> Database:
    """Connect to ``MONGODB_URI``, or start the embedded server under ``AUTHSVC_DATA_DIR``.

    Raises :class:`service.embedded.EmbeddedUnavailable` when the embedded
    server is needed but missing or failing to start.
    """
    embedded = None
    uri = settings.mongodb_uri
    if uri is None:
        embedded = EmbeddedMongo(settings.data_dir / "mongo")
        await embedded.start()
        uri = embedded.uri
    client = make_client(uri)
    try:
        concern = await durable_write_concern(client)
    except Exception:
        await client.close()
        if embedded is not None:
            embedded.stop()
        raise
    log.info(
        "database connected",
        extra=fields(embedded=embedded is not None, db=settings.mongodb_db, write_concern=concern.document),
    )
    return Database(client=client, db=client[settings.mongodb_db], write_concern=concern, embedded=embedded)
