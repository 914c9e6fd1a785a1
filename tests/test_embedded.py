"""The embedded database's files hold names and emails: only their owner may read them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.database import make_client
from service.embedded import EmbeddedMongo


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


async def start_write_stop(directory: Path) -> None:
    server = EmbeddedMongo(directory)
    await server.start()
    try:
        client = make_client(server.uri)
        await client["authsvc"]["users"].insert_one({"externalId": "user_1", "email": "ada@example.com"})
        await client.close()
    finally:
        server.stop()


@pytest.mark.usefixtures("shell_umask")
async def test_data_directory_and_database_files_are_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"  # AUTHSVC_DATA_DIR, not there yet
    await start_write_stop(data_dir / "mongo")
    assert loose(data_dir) == []
    assert any(p.is_file() for p in (data_dir / "mongo").rglob("*"))

    # A directory an older version left world-readable is made private at the next start.
    for path in [data_dir, *data_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    await start_write_stop(data_dir / "mongo")
    assert loose(data_dir / "mongo") == []
