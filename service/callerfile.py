"""``AUTHSVC_CALLERS_FILE`` kept current: read at startup, re-read when its content changes.

Every ``reload_s`` (2 s) the file is read again through its path and compared
byte for byte with what was last read, so any way of changing it is seen: an
edit in place, an atomic rename over it, a Kubernetes ConfigMap or Secret
volume swapping its ``..data`` symlink (where the file's own mtime never
changes). Polling a small file costs nothing next to the calls it guards,
and unlike inotify it follows symlink swaps and network filesystems alike.
A version that does not parse (or cannot be read) keeps the previous policy,
with one error line per distinct failure; the next good version applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from service.callers import CallerPolicy, CallersFileError, parse_policy
from service.logs import fields

log = logging.getLogger(__name__)

RELOAD_S = 2.0  # the contract: a change applies within 10 s
MAX_BYTES = 1024 * 1024


def _read(path: Path) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise CallersFileError(f"larger than {MAX_BYTES} bytes")
    return data


def _parse(data: bytes, mtls: bool) -> CallerPolicy:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise CallersFileError("not UTF-8") from None
    return parse_policy(text, mtls=mtls)


def _load(path: Path, mtls: bool) -> tuple[bytes, CallerPolicy]:
    try:
        data = _read(path)
        return data, _parse(data, mtls)
    except (OSError, CallersFileError) as exc:
        raise CallersFileError(f"{path}: {_describe(exc)}") from None


def read_policy(path: Path, *, mtls: bool) -> CallerPolicy:
    """The policy in ``path``; :class:`CallersFileError` (``"PATH: problems"``, one line) when unusable."""
    return _load(path, mtls)[1]


def _describe(exc: Exception) -> str:
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)


class CallersFile:
    """The current :class:`CallerPolicy` of ``path`` (``.policy``), re-read every ``reload_s`` while started."""

    def __init__(self, path: Path, *, mtls: bool, reload_s: float = RELOAD_S) -> None:
        self.path = path
        self._mtls = mtls
        self._reload_s = reload_s
        self._task: asyncio.Task[None] | None = None
        self._last = b""
        self._failure: str | None = None
        self.policy = CallerPolicy((), {})

    async def start(self) -> None:
        """Read the file (raising :class:`CallersFileError` when unusable) and start watching it."""
        self._last, self.policy = await asyncio.to_thread(_load, self.path, self._mtls)
        log.info("callers file loaded", extra=fields(path=str(self.path), entries=len(self.policy)))
        self._task = asyncio.create_task(self._watch(), name="callers-file")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._reload_s)
            await self.check()

    async def check(self) -> None:
        """Read the file once; apply it if it changed and parses, else keep the policy in force."""
        try:
            data = await asyncio.to_thread(_read, self.path)
            if data == self._last:
                self._failure = None
                return
            policy = _parse(data, self._mtls)
        except (OSError, CallersFileError) as exc:
            self._failed(_describe(exc))
            return
        self._last, self.policy, self._failure = data, policy, None
        log.info("callers file reloaded", extra=fields(path=str(self.path), entries=len(policy)))

    def _failed(self, problem: str) -> None:
        if problem == self._failure:  # said once per distinct failure, not at every poll
            return
        self._failure = problem
        log.error(
            "callers file not applied; the previous policy stays in force",
            extra=fields(path=str(self.path), error=problem),
        )
