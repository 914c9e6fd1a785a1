"""Opening MongoDB: the configured URI, or the embedded server when it is unset.

The client is made at once and connects in the background (a database that is
down at startup is :mod:`service.startup`'s to wait for). Options written in
``MONGODB_URI`` win; authsvc's defaults (:data:`DEFAULTS`) fill in only what
the URI leaves unsaid.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import bson
from pymongo import AsyncMongoClient, WriteConcern
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConfigurationError, OperationFailure, ServerSelectionTimeoutError
from pymongo.uri_parser import split_options

from service.embedded import EmbeddedMongo
from service.settings import Settings

log = logging.getLogger(__name__)

_OP_MSG = 2013
Document = dict[str, Any]

# authsvc's choices where MONGODB_URI says nothing, measured through a simulated election
# (bench/availability.py; the numbers are in docs/operations.md, "Availability"):
DEFAULTS: dict[str, Any] = {
    # A write waits this long for a primary: long enough to ride out an election (typically
    # under 12 s) inside the 15 s Svix gives a delivery, so a failover is not a 503. Reads on the
    # gRPC hot path and the health ping set shorter per-operation timeouts (pymongo.timeout).
    "serverSelectionTimeoutMS": 10_000,
    # The driver's own monitor re-checks a server this often; after a "not primary" error it finds
    # the new primary on its next check. The driver's 10 s default kept writes failing up to 10 s
    # after the primary was back; at 1 s they resume within about a second.
    "heartbeatFrequencyMS": 1_000,
    "connectTimeoutMS": 2_000,
    "socketTimeoutMS": 10_000,
    "appname": "authsvc",
}

# `authsvc grpc` answers callers whose deadline is 5 s by default (the client package): its writes
# (SetRole, just-in-time sync) wait at most this long for a primary, so an election is UNAVAILABLE
# within the caller's deadline, never DEADLINE_EXCEEDED. Its reads have shorter timeouts still.
GRPC_DEFAULTS: dict[str, Any] = {"serverSelectionTimeoutMS": 4_000}

# Every 2xx of the sidecar waits for this: journaled, and on a majority of a replica set. A
# standalone server accepts w: "majority" as journaled w: 1, so no round trip is needed to choose.
DURABLE = WriteConcern(w="majority", j=True)


def client_options(uri: str, **defaults: Any) -> dict[str, Any]:
    """The keyword options for a client of ``uri``: :data:`DEFAULTS` (updated with ``defaults``, a
    process's own) minus what the URI sets itself.

    Keyword options override URI options in PyMongo, so a default is only
    passed when the URI is silent about it (names compared as the driver
    does: case-insensitively, aliases normalized). A URI whose options do not
    parse gets every default; the client then reports the malformed URI.
    """
    _, _, query = uri.partition("?")
    try:
        given = split_options(query) if query else {}
    except (ConfigurationError, ValueError, TypeError):
        given = {}
    chosen = {name: value for name, value in {**DEFAULTS, **defaults}.items() if name.lower() not in given}
    return {**chosen, "tz_aware": True}


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


async def tls_mismatch(uri: str, client: AsyncMongoClient[Document], exc: BaseException) -> TlsMismatch | None:
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


def make_client(uri: str, *, defaults: Mapping[str, Any] | None = None, **overrides: Any) -> AsyncMongoClient[Document]:
    """An ``AsyncMongoClient`` for ``uri`` with :func:`client_options` (``defaults`` lose to the URI,
    ``overrides`` win over it); no I/O."""
    return AsyncMongoClient(uri, **{**client_options(uri, **(defaults or {})), **overrides})


async def durable_write_concern(client: AsyncMongoClient[Document]) -> WriteConcern:
    """The write concern that makes a 2xx safe to answer: :data:`DURABLE`, on every deployment.

    Journaled, and on a majority of a replica set (or through mongos); a
    standalone server takes ``w: "majority"`` as journaled ``w: 1``.
    """
    return DURABLE


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


async def open_database(settings: Settings, **defaults: Any) -> Database:
    """A client for ``MONGODB_URI``, or the embedded server under ``AUTHSVC_DATA_DIR`` (started first).

    ``defaults`` are the process's own client defaults (the URI still wins).
    No round trip to the database: it may still be down (:mod:`service.startup`
    waits for it). Raises :class:`service.embedded.EmbeddedUnavailable` when the
    embedded server is needed but missing or failing to start, and
    :class:`MalformedUri` when the URI does not parse.
    """
    embedded = None
    uri = settings.mongodb_uri
    if uri is None:
        embedded = EmbeddedMongo(settings.data_dir / "mongo")
        await embedded.start()
        uri = embedded.uri
    try:
        client = make_client(uri, defaults=defaults)
    except (ConfigurationError, ValueError, TypeError) as exc:  # the driver parses the URI here
        if embedded is not None:
            embedded.stop()
        raise MalformedUri(_driver_reason(exc)) from exc
    return Database(client=client, db=client[settings.mongodb_db], write_concern=DURABLE, embedded=embedded)
