"""Opening MongoDB: the configured URI, or the embedded server when it is unset.

Timeouts are short so that a dead database is answered (503 / UNAVAILABLE)
within seconds instead of after the driver's 30 s server-selection default.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from pymongo import AsyncMongoClient, WriteConcern
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConfigurationError, OperationFailure, ServerSelectionTimeoutError

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


class MalformedUri(ValueError):
    """``MONGODB_URI`` does not parse; ``str()`` is the driver's reason."""


_USERINFO = re.compile(r"^[a-z0-9+.-]+://(?P<userinfo>[^@/?#]*)@", re.IGNORECASE)


def _secrets_of(uri: str) -> list[str]:
    match = _USERINFO.match(uri)
    if match is None or ":" not in match["userinfo"]:
        return []
    password = match["userinfo"].split(":", 1)[1]
    # The driver does not echo passwords; this is a second guard, for any but trivially short ones.
    return [p for p in {password, unquote(password)} if len(p) >= 4]


def hosts_of(uri: str) -> str:
    """The host list of a MongoDB URI, never its credentials (best effort on a malformed one)."""
    rest = uri.split("://", 1)[-1]
    rest = rest.split("/", 1)[0].split("?", 1)[0]
    return rest.rsplit("@", 1)[-1] or "(no host)"


def _driver_reason(exc: BaseException) -> str:
    reason = str(exc) or type(exc).__name__
    # ServerSelectionTimeoutError: "host:port: [Errno 111] ... (configured timeouts: ...), Timeout: 2s, Topology ..."
    reason = reason.split(" (configured timeouts", 1)[0].split(", Timeout: ", 1)[0]
    return reason.splitlines()[0][:300] if reason else type(exc).__name__


def describe_failure(uri: str, exc: BaseException) -> str:
    """One line for an operator: what failed opening ``uri``, where, and the driver's reason; never the password."""
    if isinstance(exc, MalformedUri):
        line = f"MONGODB_URI is malformed: {exc}"
    elif isinstance(exc, OperationFailure):
        line = f"MongoDB at {hosts_of(uri)} refused authsvc: {_driver_reason(exc)}"
    elif isinstance(exc, ServerSelectionTimeoutError | ConfigurationError):
        hosts = hosts_of(uri)
        reason = _driver_reason(exc).removeprefix(f"{hosts}: ")
        line = f"cannot reach MongoDB at {hosts}: {reason}"
    else:
        line = f"cannot reach MongoDB at {hosts_of(uri)}: {type(exc).__name__}: {_driver_reason(exc)}"
    for secret in _secrets_of(uri):
        line = line.replace(secret, "***")
    return line


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
    server is needed but missing or failing to start, :class:`MalformedUri`
    when the URI does not parse, and the driver's error when the server does
    not answer (:func:`describe_failure` says it in one line).
    """
    embedded = None
    uri = settings.mongodb_uri
    if uri is None:
        embedded = EmbeddedMongo(settings.data_dir / "mongo")
        await embedded.start()
        uri = embedded.uri
    try:
        client = make_client(uri)
    except (ConfigurationError, ValueError, TypeError) as exc:  # the driver parses the URI here
        if embedded is not None:
            embedded.stop()
        raise MalformedUri(_driver_reason(exc)) from exc
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
