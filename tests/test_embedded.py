"""The embedded database's files hold names and emails: only their owner may read them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.database import make_client
from service.embedded import EmbeddedMongo, private_directory


@pytest.fixture
def shell_umask() -> Iterator[None]:
    """The umask of a usual login shell (022), whatever this test process was started with."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def loose(root: Path) -> list[str]:
    """Everything under ``root`` (itself included) that its group or others may use."""
    paths = [root, *root.rglob("*")]
    return [f"{p.relative_to(root.parent)} {stat.filemode(p.stat().st_mode)}" for p in paths if p.stat().st_mode & 0o77]


def test_a_data_directory_authsvc_creates_is_private(tmp_path: Path, shell_umask: None) -> None:
    private_directory(tmp_path / "data" / "dev")  # AUTHSVC_DATA_DIR and the development keys' directory
    assert loose(tmp_path / "data") == []


def test_the_shared_test_database_writes_only_private_files(mongo: EmbeddedMongo) -> None:
    assert any(p.is_file() for p in mongo.directory.rglob("*"))
    assert loose(mongo.directory) == []


async def test_a_world_readable_directory_from_an_older_version_is_made_private(
    tmp_path: Path, shell_umask: None
) -> None:
    directory = tmp_path / "mongo"
    directory.mkdir()
    (directory / "secantusd.log").write_text("an older version's log\n")
    for path in (directory, directory / "secantusd.log"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    server = EmbeddedMongo(directory)
    await server.start()
    try:
        client = make_client(server.uri)
        await client["authsvc"]["users"].insert_one({"externalId": "user_1", "email": "ada@example.com"})
        await client.close()
    finally:
        server.stop()
    assert len(list(directory.rglob("*"))) > 2
    assert loose(directory) == []
