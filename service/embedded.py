"""The embedded development database: SecantusDB as a child process.

SecantusDB (PyPI ``SecantusDB``, GPL-2.0) speaks the MongoDB wire protocol
over WiredTiger. We only run its server, as a separate process, never import
it: a production install against a real MongoDB leaves the ``embedded`` extra out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from pymongo import AsyncMongoClient

from service.logs import fields

log = logging.getLogger(__name__)

MISSING_EXTRA = (
    "MONGODB_URI is unset and the embedded database is not installed: "
    "set MONGODB_URI, or install the extra with: pip install 'authsvc[embedded]'"
)


def _private_file(path: Path, mode: str) -> IO[Any]:
    """``open(path, mode)`` for appending or writing, created 0600 when new."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode)


class EmbeddedUnavailable(Exception):
    """The embedded server cannot be started; ``str()`` is one line for the operator."""


def available() -> bool:
    return importlib.util.find_spec("secantus") is not None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


PRIVATE_UMASK = 0o077  # files 0600, directories 0700: the database holds names and emails


def private_directory(path: Path) -> Path:
    """``path`` as a directory only its owner can use: created 0700 (with any missing parents),
    an existing one's group and other bits dropped. A directory owned by someone else is left as it is."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
    mode = path.stat().st_mode
    if mode & 0o077 and path.stat().st_uid == os.geteuid():
        path.chmod(mode & 0o700)
    return path


def _make_private(root: Path) -> None:
    """Drop group and other bits from everything under ``root`` (files an older version left 0644)."""
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            mode = path.lstat().st_mode
            if mode & 0o077 and not path.is_symlink():
                path.chmod(mode & 0o700)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # Linux: the server gets SIGTERM if authsvc dies without cleaning up, so a
    # crashed parent never leaves an orphan holding the WiredTiger lock.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.setpgrp()


def _server_setup() -> None:  # pragma: no cover - runs in the database server before exec
    _die_with_parent()
    os.umask(PRIVATE_UMASK)  # every file the server creates is its owner's alone


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM ``proc``, then SIGKILL if it has not exited in ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class EmbeddedMongo:
    """A SecantusDB server on a loopback port with its files under ``directory``."""

    def __init__(
        self, directory: Path, *, host: str = "127.0.0.1", port: int | None = None, flags: Sequence[str] = ()
    ) -> None:
        self.directory = directory
        self.host = host
        self.port = port or free_port(host)
        self.flags = tuple(flags)  # extra secantusd flags, e.g. --enable-test-commands for fail points in tests
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: int | None = None

    def _hold_directory(self) -> None:
        """Lock the data directory for this process: a second server on the same files is refused clearly."""
        fd = os.open(self.directory / "authsvc.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EmbeddedUnavailable(
                f"another process holds the embedded database in {self.directory} "
                "(is another `authsvc dev` running on this AUTHSVC_DATA_DIR?)"
            ) from None
        self._lock = fd

    def _release_directory(self) -> None:
        fd, self._lock = self._lock, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _command(self) -> list[str]:
        storage = self.directory / "db"
        config = self.directory / "secantusd.toml"
        if not config.exists():
            with _private_file(config, "w") as handle:
                handle.write("# authsvc: defaults come from the command line\n")
        return [
            sys.executable, "-m", "secantus",
            "--config", str(config),
            "--host", self.host,
            "--port", str(self.port),
            "--storage-path", str(storage),
            "--log-level", "WARNING",
            "--cache-size", "256M",
            *self.flags,
        ]  # fmt: skip

    async def start(self, timeout_s: float = 30.0) -> None:
        """Start the server and wait until it answers a ping."""
        if not available():
            raise EmbeddedUnavailable(MISSING_EXTRA)
        private_directory(self.directory)
        _make_private(self.directory)
        self._hold_directory()
        logfile = _private_file(self.directory / "secantusd.log", "ab")
        try:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                preexec_fn=_server_setup,
            )
        except OSError:
            self._release_directory()
            raise
        finally:
            logfile.close()
        deadline = time.monotonic() + timeout_s
        while not await self._answers():
            if self._proc.poll() is not None:
                self._release_directory()
                raise EmbeddedUnavailable(
                    f"the embedded database exited with code {self._proc.returncode}; "
                    f"see {self.directory / 'secantusd.log'}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise EmbeddedUnavailable(f"the embedded database did not answer within {timeout_s:.0f}s")
            await asyncio.sleep(0.1)
        log.info(
            "embedded database started",
            extra=fields(pid=self._proc.pid, port=self.port, dir=str(self.directory)),
        )

    async def _answers(self) -> bool:
        # Wait for the port with a plain TCP connect first: a driver handshake
        # against a server still starting up can time out and strand its socket.
        try:
            _, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
            self.uri, serverSelectionTimeoutMS=10_000, connectTimeoutMS=10_000
        )
        try:
            await client.admin.command("ping")
            return True
        except Exception:
            return False
        finally:
            await client.close()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in ``timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            self._release_directory()
            return
        terminate(proc, timeout_s)
        self._release_directory()
        log.info("embedded database stopped", extra=fields(port=self.port))

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests use it to check durability)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._release_directory()
