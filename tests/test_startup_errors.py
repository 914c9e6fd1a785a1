"""Startup errors that name the cause: an index authsvc needs exists with other options; TLS to a plaintext server."""

from __future__ import annotations

import pytest
from pymongo import ASCENDING

from service.database import Database
from service.settings import Settings
from service.startup import StartupError, user_store


async def test_an_index_with_the_same_name_and_other_options_is_named(settings: Settings, database: Database) -> None:
    # An operator created byExternalId by hand, without `unique`.
    await database.db["users"].create_index([("externalId", ASCENDING)], name="byExternalId")
    with pytest.raises(StartupError) as info:
        async with user_store(settings):
            pass
    line = str(info.value)
    assert "\n" not in line
    assert "index byExternalId" in line and "users" in line and "different options" in line, line
    assert "database unavailable" not in line


async def test_tls_to_a_plaintext_server_is_named(settings: Settings) -> None:
    assert settings.mongodb_uri is not None
    uri = settings.mongodb_uri + ("&" if "?" in settings.mongodb_uri else "/?") + "tls=true"
    with pytest.raises(StartupError) as info:
        async with user_store(settings.model_copy(update={"mongodb_uri": uri})):
            pass
    line = str(info.value)
    assert "\n" not in line
    assert "TLS" in line and "without TLS" in line, line
    assert "No servers found yet" not in line
