"""The sidecar's own limits (issue 13, defects 1, 2, 3, 11), against a real sidecar on loopback with real sockets.

Compression bombs, slow and idle connections, the connection cap, malformed
HTTP and where ``/metrics`` is served. Timeouts and the cap are parameters
(:class:`webhook.limits.Limits`): the tests pass small ones, and one test
checks that the defaults are the contract's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import inspect
import json
import logging
import os
import resource
import sys
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import brotli
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymongo import WriteConcern

from authsvc.dev.procs import ServerProcess, child_env, free_port, http_ok
from service.database import Database, make_client
from service.errors import InvalidArgument, PayloadTooLarge
from service.settings import Settings
from service.users import UserStore
from tests.conftest import WEBHOOK_SECRET
from tests.sidecar import Sender, fixture
from tests.test_hostile_webhook import assert_no_error_logged
from webhook.body import decode
from webhook.limits import Limits, quiet_accept_errors
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
    return bytes(head + steady * (gib * 64 - 3) + compressor.finish())


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


async def test_a_body_that_does_not_decode_ends_its_connection(settings: Settings, port: int) -> None:
    body = b"\xff\xff not brotli"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_head(settings.webhook_path, content_length=len(body), content_encoding="br") + body)
    assert await asyncio.wait_for(read_response(reader), 5) == 400
    assert await closed_within(reader, 1.0)
    writer.close()


ENCODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "raw-deflate": lambda b: zlib.compress(b, wbits=-zlib.MAX_WBITS),
    "br": brotli.compress,
}


@given(plain=st.binary(max_size=4096), coding=st.sampled_from(list(ENCODERS)), limit=st.integers(1, 5000))
def test_decode_returns_the_body_or_refuses_it_past_the_limit(plain: bytes, coding: str, limit: int) -> None:
    raw = ENCODERS[coding](plain)
    header = "deflate" if coding == "raw-deflate" else coding
    if len(plain) <= limit:
        assert decode(raw, header, limit) == plain
    else:
        with pytest.raises(PayloadTooLarge):
            decode(raw, header, limit)


@given(raw=st.binary(max_size=2048), coding=st.sampled_from(["gzip", "x-gzip", "deflate", "br", "zstd", "gzip, br"]))
def test_decode_of_arbitrary_bytes_is_a_body_or_a_client_error(raw: bytes, coding: str) -> None:
    try:
        assert len(decode(raw, coding, 4096)) <= 4096
    except (InvalidArgument, PayloadTooLarge):
        pass


# --- defect 2: slow and idle connections, the connection cap -------------------------------------
SHORT = Limits(header_timeout_s=0.5, body_timeout_s=0.5, idle_timeout_s=1.5, max_connections=20)


def test_the_default_limits_are_the_contracts() -> None:
    assert Limits() == Limits(header_timeout_s=10, body_timeout_s=30, idle_timeout_s=75, max_connections=1000)
    assert inspect.signature(sidecar).parameters["limits"].default is None  # None: Limits()


async def open_idle(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    settings: Settings, store: UserStore
) -> None:
    async with sidecar(settings, store, limits=SHORT) as port:
        reader, writer = await open_idle(port)
        started = time.monotonic()
        assert await closed_within(reader, 5)
        assert 0.4 < time.monotonic() - started < 2.0
        writer.close()


async def test_headers_trickled_a_byte_at_a_time_are_cut_off(settings: Settings, store: UserStore) -> None:
    async with sidecar(settings, store, limits=SHORT) as port:
        reader, writer = await open_idle(port)
        head = request_head(settings.webhook_path, content_length=2)
        started = time.monotonic()
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < len(head) and not reader.at_eof():
                writer.write(head[sent : sent + 1])
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.05)  # a byte every 50 ms: never idle, never done
                if time.monotonic() - started > 5:
                    break
        assert await closed_within(reader, 1.0)
        assert time.monotonic() - started < 2.5
        assert 5 < sent < len(head)
        writer.close()


async def test_a_body_not_complete_within_the_body_timeout_is_408_and_closed(
    settings: Settings, store: UserStore
) -> None:
    async with sidecar(settings, store, limits=SHORT) as port:
        reader, writer = await open_idle(port)
        writer.write(request_head(settings.webhook_path, content_length=100) + b'{"type": ')
        started = time.monotonic()
        assert await asyncio.wait_for(read_response(reader), 5) == 408
        assert 0.4 < time.monotonic() - started < 2.5
        assert await closed_within(reader, 1.0)
        writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    settings: Settings, store: UserStore
) -> None:
    async with sidecar(settings, store, limits=SHORT) as port:
        reader, writer = await open_idle(port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\n\r\n")
        assert await read_response(reader) == 200
        answered = time.monotonic()
        assert not await closed_within(reader, 1.0), "closed before the idle timeout (after the header timeout?)"
        assert await closed_within(reader, 5)
        assert time.monotonic() - answered < 3.5
        writer.close()


async def test_pipelined_requests_are_all_answered_then_the_connection_idles(
    settings: Settings, store: UserStore
) -> None:
    async with sidecar(settings, store, limits=SHORT) as port:
        reader, writer = await open_idle(port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\n\r\n" * 3)
        assert [await read_response(reader) for _ in range(3)] == [200, 200, 200]
        answered = time.monotonic()
        assert await closed_within(reader, 5)  # by the idle timeout: nothing left counted in progress
        assert 1.0 < time.monotonic() - answered < 3.5
        writer.close()


CAPPED = Limits(header_timeout_s=5, body_timeout_s=5, idle_timeout_s=5, max_connections=20)


async def still_open(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> list[bool]:
    return [not closed for closed in await asyncio.gather(*(closed_within(r, 0.3) for r, _ in conns))]


async def test_past_the_cap_the_connection_waiting_longest_makes_room(settings: Settings, store: UserStore) -> None:
    async with sidecar(settings, store, limits=CAPPED) as port:
        conns = [await open_idle(port) for _ in range(20)]
        await asyncio.sleep(0.1)
        assert all(await still_open(conns))
        # A kept-alive connection that was answered just now waits since its answer: the newest waiter.
        reader, writer = conns[0]
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\n\r\n")
        assert await read_response(reader) == 200
        conns.append(await open_idle(port))
        conns.append(await open_idle(port))
        await asyncio.sleep(0.1)
        assert await still_open(conns) == [True, False, False] + [True] * 19
        for _, w in conns:
            w.close()


async def busy(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection with a request in progress: its headers sent, its body not yet."""
    reader, writer = await open_idle(port)
    writer.write(request_head(path, content_length=100) + b"{")
    return reader, writer


async def test_a_new_connection_is_closed_at_once_only_when_every_connection_is_busy(
    settings: Settings, store: UserStore
) -> None:
    path = settings.webhook_path
    async with sidecar(settings, store, limits=CAPPED) as port:
        conns = [await busy(port, path) for _ in range(19)]
        conns.append(await open_idle(port))
        await asyncio.sleep(0.1)
        conns.append(await busy(port, path))  # 19 busy, one idle: the idle one makes room
        await asyncio.sleep(0.1)
        assert await still_open(conns) == [True] * 19 + [False, True]
        late = await open_idle(port)  # 20 busy: the newcomer is closed at once (its header timeout is 5 s)
        assert await closed_within(late[0], 1.0)
        assert all(await still_open([c for i, c in enumerate(conns) if i != 19]))
        for _, w in [*conns, late]:
            w.close()


async def test_a_flood_of_connections_past_the_cap_never_locks_a_delivery_out(
    settings: Settings, store: UserStore
) -> None:
    stop = asyncio.Event()
    flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def flooding(port: int) -> None:
        while not stop.is_set():
            flood.append(await open_idle(port))
            if len(flood) > 60:
                flood.pop(0)[1].close()
            await asyncio.sleep(0.005)

    async with (
        sidecar(settings, store, limits=CAPPED) as port,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
    ):
        sender = Sender(session, f"http://127.0.0.1:{port}{settings.webhook_path}", WEBHOOK_SECRET)
        task = asyncio.create_task(flooding(port))
        await asyncio.sleep(0.3)  # about 60 connections so far, three times the cap
        for i in range(3):
            assert await sender.post(fixture("user.created", id=f"user_flood{i}")) == (200, {"status": "applied"})
        stop.set()
        await task
        assert sum(await still_open(flood)) <= CAPPED.max_connections
        for _, w in flood:
            w.close()
    assert await store.users.count_documents({}) == 3


async def test_startup_raises_the_soft_descriptor_limit_to_the_hard_one(settings: Settings, store: UserStore) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 2048:
        pytest.skip(f"needs a finite hard RLIMIT_NOFILE of at least 2048, not {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        async with sidecar(settings, store):
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# The real sidecar, in a child process whose hard descriptor limit is 300: too few for 1,000 connections.
LOW_HARD_LIMIT = """
import resource, runpy
resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))
runpy.run_module("webhook", run_name="__main__")
"""


async def test_too_few_descriptors_lower_the_cap_with_a_warning(
    settings: Settings, database: Database, tmp_path: Path
) -> None:
    port = free_port()
    process = ServerProcess(
        "sidecar",
        [sys.executable, "-c", LOW_HARD_LIMIT],
        env=child_env(
            MONGODB_URI=str(settings.mongodb_uri),
            MONGODB_DB=settings.mongodb_db,
            CLERK_WEBHOOK_SECRET=WEBHOOK_SECRET,
            AUTHSVC_WEBHOOK_ADDR=f"127.0.0.1:{port}",
        ),
        logfile=tmp_path / "sidecar.log",
    )
    await process.start_ready(http_ok(f"http://127.0.0.1:{port}/healthz"))
    try:
        (warning,) = [json.loads(line) for line in process.output().splitlines() if "descriptors" in line]
        assert warning["level"] == "warning" and warning["max_connections"] == 225 and warning["nofile_limit"] == 300
        conns = [await open_idle(port) for _ in range(235)]  # the cap holds: the oldest make room
        await asyncio.sleep(0.2)
        assert sum(await still_open(conns)) == 225
        for _, w in conns:
            w.close()
    finally:
        process.stop()


# The sidecar's process runs out of descriptors: a child process connects 40 times, the sidecar can accept 3.
CONNECT_40 = """
import socket, sys
sys.stdin.readline()
conns = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(40)]
print("open", flush=True)
sys.stdin.read()
"""


@contextlib.asynccontextmanager
async def out_of_descriptors(port: int) -> AsyncIterator[None]:
    """Inside the block this process may open 3 more descriptors, and a child process holds 40 connections
    to ``port`` that the listener keeps failing to accept. On leaving: the limit back, then the child gone."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONNECT_40, str(port), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdin is not None and child.stdout is not None
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 3, hard))
    try:
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        assert await asyncio.wait_for(child.stdout.readline(), 10) == b"open\n"
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        child.stdin.close()
        await child.wait()


async def test_running_out_of_descriptors_is_one_warning_not_a_flood(
    settings: Settings, store: UserStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with sidecar(settings, store) as port, aiohttp.ClientSession() as session:
        async with out_of_descriptors(port):
            await asyncio.sleep(2.5)  # asyncio tries to accept again every second
        async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200
    lines = [r for r in caplog.records if "system resource" in r.getMessage() or "descriptors" in r.getMessage()]
    assert [(r.levelno, r.exc_info) for r in lines] == [(logging.WARNING, None)]
    assert_no_error_logged(caplog)


async def test_stopping_just_after_running_out_of_descriptors_logs_no_error(caplog: pytest.LogCaptureFixture) -> None:
    # asyncio retries a failed accept a second later, even once its server is closed: the retry on
    # the closed socket must not become an error-level traceback of a sidecar that is stopping.
    caplog.set_level(logging.INFO)
    with quiet_accept_errors():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        async with out_of_descriptors(server.sockets[0].getsockname()[1]):
            await asyncio.sleep(0.2)
            assert any("out of file descriptors" in r.getMessage() for r in caplog.records)
            server.close()
    await server.wait_closed()
    await asyncio.sleep(1.5)  # past asyncio's retry of the accept
    assert_no_error_logged(caplog)


# --- defect 3: malformed HTTP is one info line ---------------------------------------------------
MALFORMED = {
    "header-line-too-long": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"AAAA" * 2500 + b"\r\n\r\n",
    "request-line-too-long": b"GET /" + b"AAAA" * 2500 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "control-character": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: AAAA\x01AAAA\r\n\r\n",
    "nul-in-a-header-name": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-AAAA\x00: 1\r\n\r\n",
    "bad-chunk-size": b"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nAAAAzz\r\nA\r\n0\r\n\r\n",
    "content-length-and-transfer-encoding": (
        b"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "not-http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03AAAA" + b"\x00" * 40 + b"\r\n\r\n",
    "garbage-after-a-good-request": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nAAAA\x00\x01 / HTTP/1.1\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_http_is_400_and_one_info_line_without_a_traceback(
    settings: Settings, port: int, caplog: pytest.LogCaptureFixture, raw: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw.replace(b"{path}", settings.webhook_path.encode()))
    statuses = []
    with contextlib.suppress(ValueError, IndexError, asyncio.IncompleteReadError):
        while True:
            statuses.append(await asyncio.wait_for(read_response(reader), 5))
    assert statuses[-1] == 400 and await closed_within(reader, 1.0)
    writer.close()
    await asyncio.sleep(0.1)
    records = [r for r in caplog.records if r.levelno >= logging.INFO or r.exc_info]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.INFO, None)], [r.getMessage() for r in records]
    assert "AAAA" not in records[0].getMessage() + str(getattr(records[0], "fields", ""))


async def test_a_chunk_size_that_is_not_hex_mid_body_is_400_and_one_info_line(
    settings: Settings, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_head(settings.webhook_path, transfer_encoding="chunked") + b"2\r\n{}\r\n")
    await asyncio.sleep(0.1)  # the handler is reading the body
    writer.write(b"AAAAzz\r\n")
    assert await asyncio.wait_for(read_response(reader), 5) == 400
    assert await closed_within(reader, 1.0)
    writer.close()
    await asyncio.sleep(0.1)
    records = [r for r in caplog.records if r.levelno >= logging.INFO or r.exc_info]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.INFO, None)], [r.getMessage() for r in records]


# --- defect 11: /metrics off the public address, /readyz says only ready or not ----------------------
async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


async def test_with_a_metrics_address_metrics_leave_the_public_address(settings: Settings, store: UserStore) -> None:
    metrics_port = free_port()
    moved = settings.model_copy(update={"webhook_metrics_addr": f"127.0.0.1:{metrics_port}"})
    async with aiohttp.ClientSession() as session:
        async with sidecar(settings, store) as port:
            status, text = await get(session, f"http://127.0.0.1:{port}/metrics")
            assert status == 200 and "authsvc_webhook_deliveries_total" in text
        async with sidecar(moved, store) as port:
            assert (await get(session, f"http://127.0.0.1:{port}/metrics"))[0] == 404
            status, text = await get(session, f"http://127.0.0.1:{metrics_port}/metrics")
            assert status == 200 and "authsvc_webhook_deliveries_total" in text
            assert await get(session, f"http://127.0.0.1:{port}/readyz") == (200, '{"status": "ready"}')


async def test_readyz_without_a_database_says_not_ready_and_nothing_more(settings: Settings) -> None:
    client = make_client(f"mongodb://127.0.0.1:{free_port()}", serverSelectionTimeoutMS=200)
    store = UserStore(client["nowhere"], write_concern=WriteConcern())
    try:
        async with sidecar(settings, store) as port, aiohttp.ClientSession() as session:
            assert await get(session, f"http://127.0.0.1:{port}/readyz") == (503, '{"status": "not ready"}')
    finally:
        await client.close()
