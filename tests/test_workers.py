"""``AUTHSVC_WORKERS=2``: real ``authsvc grpc`` and ``authsvc webhook`` parents with two worker processes each.

Every call goes over a fresh connection, so the kernel's ``SO_REUSEPORT``
balancing spreads them over both workers. Per-worker counts come from the
workers' own files in the run's ``PROMETHEUS_MULTIPROC_DIR``; ``/metrics`` must
equal their sum, exactly the calls this test made.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from authsvc.dev.events import clerk_event, signed_headers
from authsvc.dev.procs import child_env, health_check
from authsvc_client.v1 import authsvc_pb2, authsvc_pb2_grpc
from service.embedded import EmbeddedMongo, free_port
from service.workers import Policy, Supervisor, _Slot
from tests.conftest import WEBHOOK_SECRET
from tests.issuer import LocalIssuer

AUTHSVC = str(Path(sys.executable).with_name("authsvc"))
GRPCURL = str(Path(sys.executable).with_name("grpcurl"))
AUTH = "authsvc.v1.AuthService"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Parent:
    """An ``authsvc`` command with two workers; stderr (JSON lines) goes to a file."""

    def __init__(self, command: str, tmp_path: Path, **env: str) -> None:
        self.command = command
        self.tmp = tmp_path
        self.port, self.metrics_port = free_port(), free_port()
        self.env = child_env(
            AUTHSVC_WORKERS="2",
            AUTHSVC_GRPC_ADDR=f"127.0.0.1:{self.port}",
            AUTHSVC_WEBHOOK_ADDR=f"127.0.0.1:{self.port}",
            AUTHSVC_METRICS_ADDR=f"127.0.0.1:{self.metrics_port}",
            AUTHSVC_DRAIN_S="0.2",
            TMPDIR=str(tmp_path),  # the run's metrics directory is made under it
            **env,
        )
        self.log = tmp_path / f"{command}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [AUTHSVC, self.command], env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT
            )

    def events(self, name: str) -> list[dict[str, object]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == name:
                    found.append(entry)
        return found

    def serving_pids(self) -> list[int]:
        return [int(str(e["pid"])) for e in self.events("worker serving")]

    async def wait_serving(self, count: int, timeout_s: float = 60.0) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while len(pids := self.serving_pids()) < count:
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"workers did not serve:\n{self.log.read_text()}")
            await asyncio.sleep(0.1)
        return pids

    def metrics_dir(self) -> Path:
        (found,) = self.tmp.glob("authsvc-metrics-*")
        return found

    def worker_counts(self, pid: int, name: str) -> float:
        """The sum of one worker's samples of ``name`` (from its own file in the metrics directory)."""
        files = [str(p) for p in self.metrics_dir().glob(f"*_{pid}.db")]
        return sum(
            sample.value
            for family in MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
            for sample in family.samples
            if sample.name == name
        )

    def stop(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


def children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            if int(fields[1]) == pid and fields[0] != b"Z":
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


async def scrape(url: str) -> Samples:
    """Every sample of ``/metrics``, parsed with prometheus_client's own parser."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much the samples of ``name`` matching ``labels`` grew."""

    def total(samples: Samples) -> float:
        return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())

    return total(after) - total(before)


async def fresh_call(addr: str, call: Callable[[grpc.aio.Channel], object]) -> object:
    async with grpc.aio.insecure_channel(addr) as channel:
        return await call(channel)  # type: ignore[misc]


@pytest.fixture
async def grpc_parent(mongo: EmbeddedMongo, issuer: LocalIssuer, tmp_path: Path) -> AsyncIterator[Parent]:
    parent = Parent(
        "grpc",
        tmp_path,
        MONGODB_URI=mongo.uri,
        MONGODB_DB=f"t_{uuid.uuid4().hex[:12]}",
        CLERK_FRONTEND_API_URL=issuer.url,
        AUTHSVC_LOG_LEVEL="info",
    )
    parent.start()
    try:
        await parent.wait_serving(2)
        yield parent
    finally:
        if parent.proc is not None and parent.proc.poll() is None:
            parent.proc.kill()
            parent.proc.wait()


def verify(token: str, *, wait_for_ready: bool = False) -> Callable[[grpc.aio.Channel], object]:
    def call(channel: grpc.aio.Channel) -> object:
        request = authsvc_pb2.VerifyTokenRequest(token=token)
        return authsvc_pb2_grpc.AuthServiceStub(channel).VerifyToken(request, wait_for_ready=wait_for_ready, timeout=20)

    return call


async def test_two_workers_serve_and_metrics_count_every_call_exactly(grpc_parent: Parent, issuer: LocalIssuer) -> None:
    metrics_url = f"http://127.0.0.1:{grpc_parent.metrics_port}/metrics"
    before = await scrape(metrics_url)
    token = issuer.mint("user_workers")
    for _ in range(40):
        reply = await fresh_call(grpc_parent.addr, verify(token))
        assert isinstance(reply, authsvc_pb2.VerifyTokenResponse) and reply.subject == "user_workers"
    for _ in range(6):
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await fresh_call(grpc_parent.addr, verify("not-a-token"))
        assert denied.value.code() is grpc.StatusCode.UNAUTHENTICATED
    for _ in range(4):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await fresh_call(
                grpc_parent.addr,
                lambda ch: authsvc_pb2_grpc.AuthServiceStub(ch).GetUser(
                    authsvc_pb2.GetUserRequest(external_id="user_nobody")
                ),
            )
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    for _ in range(3):
        await fresh_call(grpc_parent.addr, lambda ch: health_check(ch)(health_pb2.HealthCheckRequest()))
    listed = await asyncio.create_subprocess_exec(
        GRPCURL, "-plaintext", grpc_parent.addr, "list", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await listed.communicate()
    assert listed.returncode == 0 and AUTH in out.decode()

    after = await scrape(metrics_url)
    handled = "grpc_server_handled_total"
    assert delta(before, after, handled, grpc_method="VerifyToken", grpc_code="OK") == 40
    assert delta(before, after, handled, grpc_method="VerifyToken", grpc_code="UNAUTHENTICATED") == 6
    assert delta(before, after, handled, grpc_method="GetUser", grpc_code="NOT_FOUND") == 4
    assert delta(before, after, handled, grpc_service="grpc.health.v1.Health", grpc_method="Check") == 3
    assert delta(before, after, "grpc_server_started_total", grpc_service=AUTH, grpc_type="unary") == 50
    assert delta(before, after, "grpc_server_handling_seconds_count", grpc_method="VerifyToken") == 46
    assert delta(before, after, handled, grpc_type="bidi_stream", grpc_code="OK") == 1  # reflection (grpcurl list)
    assert delta(before, after, "authsvc_denials_total", method="VerifyToken", reason="TOKEN_MALFORMED") == 6
    assert delta(before, after, "authsvc_denials_total", method="GetUser", reason="USER_NOT_FOUND") == 4
    # Each worker verified the token once; every other valid call hit its cache.
    assert delta(before, after, "authsvc_token_cache_total", result="miss") <= 2 + 6
    assert delta(before, after, "authsvc_token_cache_total", result="hit") >= 38

    # Both workers served VerifyToken calls, and /metrics is the sum of the two.
    pids = grpc_parent.serving_pids()
    per_worker = [grpc_parent.worker_counts(pid, handled) for pid in pids]
    assert len(pids) == 2 and all(count > 0 for count in per_worker), per_worker
    total = sum(v for (n, _), v in after.items() if n == handled)
    assert total == sum(per_worker)
    # Gauges are never summed: the database is up for every worker (the minimum), the cache fresh (the maximum).
    assert after[("authsvc_database_up", ())] == 1
    assert after[("authsvc_user_cache_stale_seconds", ())] < 5


async def test_a_killed_worker_is_restarted_and_calls_keep_succeeding(grpc_parent: Parent, issuer: LocalIssuer) -> None:
    token = issuer.mint("user_workers")
    victim, survivor = grpc_parent.serving_pids()
    os.kill(victim, signal.SIGKILL)
    # A connection caught by the kill (queued on its socket) or by the replacement's socket
    # joining the group is reset; a gRPC client waiting for ready connects again and succeeds.
    deadline = time.monotonic() + 60
    while len(grpc_parent.serving_pids()) < 3:
        reply = await fresh_call(grpc_parent.addr, verify(token, wait_for_ready=True))  # every call succeeds
        assert isinstance(reply, authsvc_pb2.VerifyTokenResponse)
        assert time.monotonic() < deadline, grpc_parent.log.read_text()
        await asyncio.sleep(0.05)
    replacement = grpc_parent.serving_pids()[-1]
    assert replacement not in (victim, survivor) and alive(survivor) and not alive(victim)
    assert [e["exit_code"] for e in grpc_parent.events("worker died; restarting")] == [-signal.SIGKILL]
    for _ in range(20):
        await fresh_call(grpc_parent.addr, verify(token, wait_for_ready=True))
    assert grpc_parent.stop() == 0


async def test_sigterm_under_load_finishes_calls_in_flight_and_leaves_no_orphan(
    grpc_parent: Parent, issuer: LocalIssuer
) -> None:
    assert grpc_parent.proc is not None
    workers = children(grpc_parent.proc.pid)
    assert len(set(workers) & set(grpc_parent.serving_pids())) == 2
    # A new signing key: each worker's first call with it waits on a JWKS fetch held for 1.5 s.
    issuer.rotate()
    issuer.delay_s = 1.5
    token = issuer.mint("user_workers")
    async with grpc.aio.insecure_channel(grpc_parent.addr) as a, grpc.aio.insecure_channel(grpc_parent.addr) as b:
        calls = [
            asyncio.ensure_future(authsvc_pb2_grpc.AuthServiceStub(channel).VerifyToken(
                authsvc_pb2.VerifyTokenRequest(token=token)
            ))
            for channel in (a, b) for _ in range(10)
        ]  # fmt: skip
        await asyncio.sleep(0.5)  # the calls have reached the workers and wait on the JWKS
        grpc_parent.proc.send_signal(signal.SIGTERM)
        replies = await asyncio.gather(*calls)
    assert all(reply.subject == "user_workers" for reply in replies)
    assert await asyncio.to_thread(grpc_parent.proc.wait, 30) == 0
    # The workers, and multiprocessing's resource tracker (it exits once they all have).
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not any(alive(pid) for pid in workers)
    assert not list(tmp for tmp in grpc_parent.tmp.glob("authsvc-metrics-*"))  # the run's directory is gone


async def test_a_second_authsvc_grpc_on_the_same_address_exits_2(grpc_parent: Parent, tmp_path: Path) -> None:
    for workers in ("2", "1"):
        env = {**grpc_parent.env, "AUTHSVC_WORKERS": workers, "AUTHSVC_METRICS_ADDR": f"127.0.0.1:{free_port()}"}
        second = await asyncio.create_subprocess_exec(
            AUTHSVC, "grpc", env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(second.communicate(), 60)
        lines = [line for line in err.decode().splitlines() if not line.startswith("{")]
        assert second.returncode == 2, err.decode()
        assert len(lines) == 1 and grpc_parent.addr in lines[0], err.decode()
    assert grpc_parent.stop() == 0


async def test_workers_start_without_the_database_and_say_so(tmp_path: Path) -> None:
    parent = Parent(
        "grpc", tmp_path, MONGODB_URI=f"mongodb://127.0.0.1:{free_port()}", CLERK_FRONTEND_API_URL="http://127.0.0.1:9"
    )
    parent.start()
    try:
        await parent.wait_serving(2)  # listening, waiting for the database
        reply = await fresh_call(parent.addr, lambda ch: health_check(ch)(health_pb2.HealthCheckRequest(), timeout=5))
        assert isinstance(reply, health_pb2.HealthCheckResponse)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        samples = await scrape(f"http://127.0.0.1:{parent.metrics_port}/metrics")
        assert samples[("authsvc_database_up", ())] == 0
        assert len(parent.events("database unreachable; retrying")) >= 2  # both workers, one line per attempt
    finally:
        assert parent.stop() == 0


def test_restarts_back_off_then_give_up_when_workers_die_in_a_loop() -> None:
    policy = Policy(backoff_s=0.5, max_backoff_s=2.0, window_s=60.0, max_deaths=4)
    supervisor = Supervisor.__new__(Supervisor)
    supervisor.policy = policy
    slot = _Slot(0)
    delays = [supervisor._backoff(slot, 100.0 + i) for i in range(5)]
    assert delays == [0.5, 1.0, 2.0, 2.0, None]
    # Deaths older than the window are forgotten.
    assert supervisor._backoff(slot, 1000.0) == 0.5


# --- the sidecar --------------------------------------------------------------------------------
async def post(session: aiohttp.ClientSession, url: str, event: dict[str, object], svix_id: str, secret: str) -> str:
    body = json.dumps(event)
    async with session.post(url, data=body, headers=signed_headers(secret, body, svix_id)) as response:
        if response.status != 200:
            return f"http {response.status}"
        return str((await response.json())["status"])


async def test_sidecar_workers_count_deliveries_by_type_and_outcome(mongo: EmbeddedMongo, tmp_path: Path) -> None:
    parent = Parent(
        "webhook",
        tmp_path,
        MONGODB_URI=mongo.uri,
        MONGODB_DB=f"t_{uuid.uuid4().hex[:12]}",
        CLERK_WEBHOOK_SECRET=WEBHOOK_SECRET,
        AUTHSVC_LOG_LEVEL="info",
    )
    # /metrics off the public address: the parent serves the workers' sum there (AUTHSVC_WEBHOOK_METRICS_ADDR).
    parent.env["AUTHSVC_WEBHOOK_METRICS_ADDR"] = f"127.0.0.1:{parent.metrics_port}"
    parent.start()
    try:
        await parent.wait_serving(2)
        base = f"http://{parent.addr}"
        url = f"{base}/clerk-users-webhook"
        metrics_url = f"http://127.0.0.1:{parent.metrics_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as response:
            assert response.status == 404
        before = await scrape(metrics_url)
        outcomes: list[str] = []
        for i in range(12):
            # A new connection per delivery: the kernel spreads them over both workers.
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                event = clerk_event("user.created", f"user_w{i}", now_ms=1_700_000_000_000 + i)
                outcomes.append(await post(session, url, event, f"msg_w{i}", WEBHOOK_SECRET))
                if i < 3:
                    outcomes.append(await post(session, url, event, f"msg_w{i}", WEBHOOK_SECRET))
                if i < 2:
                    outcomes.append(await post(session, url, event, f"msg_x{i}", "whsec_" + "A" * 32))
                if i < 5:
                    login = clerk_event("session.created", f"user_nobody{i}")
                    outcomes.append(await post(session, url, login, f"msg_s{i}", WEBHOOK_SECRET))
        assert sorted(set(outcomes)) == ["applied", "duplicate", "http 401", "ignored"]
        after = await scrape(metrics_url)
        again = await scrape(metrics_url)
        name = "authsvc_webhook_deliveries_total"
        assert delta(before, after, name, type="user.created", outcome="applied") == 12
        assert delta(before, after, name, type="user.created", outcome="duplicate") == 3
        assert delta(before, after, name, type="unknown", outcome="rejected") == 2
        assert delta(before, after, name, type="session.created", outcome="ignored") == 5
        assert delta(before, after, "authsvc_webhook_delivery_seconds_count") == len(outcomes)
        assert delta(after, again, name) == 0
        assert after[("authsvc_database_up", ())] == 1  # the minimum over workers, never a sum
        pids = parent.serving_pids()
        assert all(parent.worker_counts(pid, name) > 0 for pid in pids), pids
    finally:
        assert parent.stop() == 0
