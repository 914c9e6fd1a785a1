"""The sidecar's own limits (issue 13, defects 1, 2, 3, 11), against a real sidecar on loopback with real sockets.

Compression bombs, slow and idle connections, the connection cap, malformed
HTTP and where ``/metrics`` is served. Timeouts and the cap are parameters
(:class:`webhook.limits.Limits`): the tests pass small ones, and one test
checks that the defaults are the contract's.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator

import aiohttp
import brotli
import pytest

from service.settings import Settings
from service.users import UserStore
from webhook.main import sidecar


# --- raw HTTP over a socket -------------------------------------------------------------------
async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response (status line, headers, a Content-Length body); return its status."""
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closes the connection (EOF or reset) within ``seconds``."""
    try:
        return await asyncio.wait_for(reader.read(65536), seconds) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def request_head(path: str, **headers: str | int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: sidecar"] + [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- defect 1: compression bombs ----------------------------------------------------------------
def brotli_bomb(gib: int) -> bytes:
    """A few KB of ``br`` that inflate to ``gib`` GiB of zeros.

    The stream is flushed after every 16 MiB block, so every block after the
    first two compresses to the same byte-aligned bytes: repeating one makes a
    valid stream of any length without compressing it all.
    """
    compressor = brotli.Compressor(quality=5, lgwin=24)
    block = b"\0" * (16 << 20)
    head = b"".join(compressor.process(block) + compressor.flush() for _ in range(2))
    steady = compressor.process(block) + compressor.flush()
    return head + steady * (gib * 64 - 3) + compressor.finish()


def gzip_bomb(mib: int) -> bytes:
    """Just under 1 MiB of ``gzip`` that inflates to ``mib`` MiB of zeros (no trailer: the bomb is the point).

    A full flush after each 1 MiB block byte-aligns the stream, so the blocks
    after the first compress to the same bytes (deflate's limit is about 1:1032).
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1 << 20)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    steady = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + steady * (mib - 1)


BOMBS = {"br": lambda: brotli_bomb(10), "gzip": lambda: gzip_bomb(1000)}


class Probe:
    """``GET /healthz`` in a loop on its own connection: the longest it took to answer."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url, self.worst = session, url, 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            async with self.session.get(self.url) as response:
                assert response.status == 200
            self.worst = max(self.worst, time.perf_counter() - started)
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> Probe:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def port(settings: Settings, store: UserStore) -> AsyncIterator[int]:
    async with sidecar(settings, store) as bound:
        yield bound


@pytest.mark.parametrize("encoding", list(BOMBS))
async def test_a_compression_bomb_is_413_ends_its_connection_and_never_stalls_healthz(
    settings: Settings, port: int, encoding: str
) -> None:
    body = BOMBS[encoding]()
    assert len(body) < 1024 * 1024
    async with aiohttp.ClientSession() as session, Probe(session, f"http://127.0.0.1:{port}/healthz") as probe:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        cpu = time.process_time()
        head = request_head(settings.webhook_path, content_length=len(body), content_encoding=encoding)
        writer.write(head + body)
        assert await asyncio.wait_for(read_response(reader), 5) == 413
        assert await closed_within(reader, 1.0), "the refused request's connection stayed open"
        await asyncio.sleep(1.5)  # were the server still inflating, the probe would be waiting now
        spent = time.process_time() - cpu
        writer.close()
    assert probe.worst < 1.0, f"/healthz took {probe.worst:.1f} s during the bomb"
    assert spent < 1.0, f"the bomb cost {spent:.1f} s of CPU"
