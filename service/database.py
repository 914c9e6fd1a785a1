"""Opening MongoDB: the configured URI, or the embedded server when it is unset.

Timeouts are short so that a dead database is answered (503 / UNAVAILABLE)
within seconds instead of after the driver's 30 s server-selection default.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import bson
from pymongo import AsyncMongoClient, WriteConcern
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConfigurationError, OperationFailure, ServerSelectionTimeoutError

from service.embedded import EmbeddedMongo
from service.logs import fields
from service.settings import Settings

log = logging.getLogger(__name__)

_OP_MSG = 2013
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


class TlsMismatch(Exception):
    """``MONGODB_URI`` asks for TLS and the server answers in plaintext; ``str()`` says so in one line."""


class IndexConflict(Exception):
    """An index authsvc creates exists under the same name with other keys or options."""

    CODES = frozenset({85, 86})  # IndexOptionsConflict, IndexKeySpecsConflict

    def __init__(self, collection: str, name: str, code_name: str) -> None:
        super().__init__(
            f"index {name} on {collection} already exists with different options ({code_name}): "
            f"drop it (db.{collection}.dropIndex({name!r})) and authsvc creates it at startup"
        )


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
    elif isinstance(exc, TlsMismatch | IndexConflict):
        line = str(exc)
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


_TLS_ON = re.compile(r"[?&](tls|ssl)=true(&|$)", re.IGNORECASE)
_TLS_OFF = re.compile(r"[?&](tls|ssl)=false(&|$)", re.IGNORECASE)


def _asks_tls(uri: str) -> bool:
    """TLS per the URI: ``tls=true`` (or ``ssl=true``), or ``mongodb+srv://`` unless turned off."""
    if _TLS_OFF.search(uri):
        return False
    return bool(_TLS_ON.search(uri)) or uri.lower().startswith("mongodb+srv://")


async def _answers_plaintext(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether a MongoDB server on ``host:port`` answers a plaintext ``hello`` (OP_MSG)."""
    request_id = 1
    body = b"\x00\x00\x00\x00\x00" + bson.encode({"hello": 1, "$db": "admin"})  # flagBits, section kind 0
    message = struct.pack("<iiii", 16 + len(body), request_id, 0, _OP_MSG) + body
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(message)
                header = await reader.readexactly(16)
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    _, _, response_to, op_code = struct.unpack("<iiii", header)
    return bool(response_to == request_id and op_code == _OP_MSG)


async def _tls_mismatch(uri: str, client: AsyncMongoClient[Document], exc: BaseException) -> TlsMismatch | None:
    """When a TLS connection found no server: the first seed that answers in plaintext, as a :class:`TlsMismatch`."""
    if not isinstance(exc, ServerSelectionTimeoutError) or not _asks_tls(uri):
        return None
    for host, port in client.topology_description.server_descriptions():
        if await _answers_plaintext(host, port or 27017):
            return TlsMismatch(
                f"MONGODB_URI asks for TLS, but MongoDB at {host}:{port} answers without TLS: "
                "remove tls=true from MONGODB_URI, or enable TLS on the server"
            )
    return None


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
    except Exception as exc:
        mismatch = await _tls_mismatch(uri, client, exc)
        await client.close()
        if embedded is not None:
            embedded.stop()
        if mismatch is not None:
            raise mismatch from exc
        raise
    log.info(
        "database connected",
        extra=fields(embedded=embedded is not None, db=settings.mongodb_db, write_concern=concern.document),
    )
    return Database(client=client, db=client[settings.mongodb_db], write_concern=concern, embedded=embedded)
