"""Shared fixtures: a real embedded database per session, a fresh database name per test.

Every server runs on a loopback port and is started and stopped by the test
that needs it. Nothing here mocks the database or the network.
"""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from service.database import Database, durable_write_concern, make_client
from service.embedded import EmbeddedMongo
from service.settings import Settings
from service.users import UserStore
from tests.fakeclerk import FakeClerk
from tests.issuer import LocalIssuer

# Property tests: a quick profile for `make test`, ten times more (and more) for `make fuzz`.
# Each test reuses its function-scoped server across examples, on purpose.
_PROFILE = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
hypothesis_settings.register_profile("default", max_examples=60, **_PROFILE)  # type: ignore[arg-type]
hypothesis_settings.register_profile("fuzz", max_examples=1000, **_PROFILE)  # type: ignore[arg-type]
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"authsvc-test-secret-0123456789ab").decode()


@pytest.fixture(scope="session")
def mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedMongo]:
    """One embedded SecantusDB for the whole run (tests that stop or kill it start their own)."""
    server = EmbeddedMongo(tmp_path_factory.mktemp("mongo"))
    asyncio.run(server.start())
    yield server
    server.stop()


@pytest.fixture
def settings(mongo: EmbeddedMongo, tmp_path: Path) -> Settings:
    return Settings(
        mongodb_uri=mongo.uri,
        mongodb_db=f"t_{uuid.uuid4().hex[:12]}",
        data_dir=tmp_path / "data",
        webhook_secrets=(WEBHOOK_SECRET,),
        webhook_addr="127.0.0.1:0",
        grpc_addr="127.0.0.1:0",
    )


async def open_test_database(settings: Settings) -> Database:
    assert settings.mongodb_uri is not None
    client = make_client(settings.mongodb_uri)
    concern = await durable_write_concern(client)
    return Database(client=client, db=client[settings.mongodb_db], write_concern=concern)


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    """A fresh database name on the shared server, dropped afterwards."""
    db = await open_test_database(settings)
    yield db
    await db.client.drop_database(settings.mongodb_db)
    await db.close()


@pytest.fixture
async def store(settings: Settings, database: Database) -> UserStore:
    s = UserStore(database.db, write_concern=database.write_concern, delete_mode=settings.delete_mode)
    await s.ensure_indexes()
    return s


@pytest.fixture
async def issuer() -> AsyncIterator[LocalIssuer]:
    """A local JWKS issuer on a loopback port (take it down, slow it, rotate its keys)."""
    async with LocalIssuer() as issuer:
        yield issuer


@pytest.fixture
async def fake_clerk() -> AsyncIterator[FakeClerk]:
    """A fake Clerk Backend API on a loopback port (users, pages, 429s, outages on demand)."""
    async with FakeClerk() as clerk:
        yield clerk
