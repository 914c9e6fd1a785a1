"""Rollouts: a replica leaves under load and no call fails; a long-lived connection is ended after its age.

The replicas are ``authsvc grpc`` child processes, as production runs them;
the load comes through the client package, as a calling service's would.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

from authsvc.dev.procs import grpc_serving
from authsvc_client import AuthsvcClient
from bench.availability import run_until, verify_load
from service.settings import Settings
from service.users import UserStore
from tests.grpc_helpers import FRONTEND, seed, serve
from tests.issuer import LocalIssuer
from tests.tcpproxy import tcp_proxy
from tests.test_faults import grpc_process


def calls_served(log: Path) -> int:
    count = 0
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "rpc":
            count += 1
    return count


async def test_sigterm_to_one_of_two_replicas_under_load_fails_no_call(
    settings: Settings, store: UserStore, issuer: LocalIssuer, tmp_path: Path
) -> None:
    users = [f"user_{i}" for i in range(8)]
    for user in users:
        await seed(store, user)
    tokens = [issuer.mint(user, azp=FRONTEND) for user in users]
    replicas = [
        grpc_process(
            settings, issuer, tmp_path / f"grpc-{i}.log", AUTHSVC_DRAIN_S="1", AUTHSVC_METRICS_ADDR="127.0.0.1:0"
        )
        for i in range(2)
    ]
    for replica, _ in replicas:
        replica.start()
    try:
        for replica, port in replicas:
            await replica.wait_ready(grpc_serving(f"127.0.0.1:{port}"))
        (leaving, _), (staying, _) = replicas
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for _, port in replicas)
        async with AuthsvcClient(target) as authsvc:  # round_robin, health-checked: the client package's default
            stop = asyncio.Event()
            load = asyncio.create_task(verify_load(authsvc, tokens, stop))
            await asyncio.sleep(1.0)
            served_before = calls_served(leaving.logfile)
            os.kill(leaving.pid, signal.SIGTERM)
            assert leaving.proc is not None
            code = await asyncio.to_thread(leaving.proc.wait, 30)
            await run_until(stop, 0.5)
            tally = await load
        print(f"\nrollout: {tally}")
        assert tally.failed == 0, tally
        assert code == 0
        assert served_before > 0 and calls_served(staying.logfile) > 0  # both replicas took calls
    finally:
        for replica, _ in replicas:
            await asyncio.to_thread(replica.stop)


async def test_a_connection_is_ended_after_its_age_while_calls_keep_succeeding(
    settings: Settings, store: UserStore, issuer: LocalIssuer
) -> None:
    await seed(store, "user_1")
    async with serve(settings, store, issuer, max_connection_age_s=0.5, drain_s=0.5) as h:
        token = h.token("user_1")
        async with tcp_proxy("127.0.0.1", h.service.port) as proxy, AuthsvcClient(proxy.address, attempts=1) as client:
            stop = asyncio.Event()
            load = asyncio.create_task(verify_load(client, [token], stop, concurrency=4))
            await run_until(stop, 2.0)
            tally = await load
        assert tally.failed == 0 and tally.ok > 0, tally
        # The first connection, then a new one after each GOAWAY (0.5 s +/- 10 %): the calls moved over unharmed.
        assert proxy.accepted >= 3, proxy.accepted


async def test_the_client_balances_over_servers_and_skips_one_that_drains(
    settings: Settings, store: UserStore, issuer: LocalIssuer
) -> None:
    await seed(store, "user_1")
    async with serve(settings, store, issuer) as a, serve(settings, store, issuer) as b:
        token = a.token("user_1")
        guards = [a.service.server.calls, b.service.server.calls]
        async with AuthsvcClient(f"ipv4:{a.target},{b.target}", attempts=1) as client:
            before = [guard.last_started for guard in guards]
            for _ in range(20):
                await client.verify(token)
            assert all(guard.last_started > then for guard, then in zip(guards, before, strict=True))  # both

            await a.service.server.health.enter_graceful_shutdown()  # NOT_SERVING, as at SIGTERM
            await asyncio.sleep(0.3)  # the client's health watch hears it
            drained = guards[0].last_started
            for _ in range(20):
                await client.verify(token)
            assert guards[0].last_started == drained  # no new call reached the draining server
            assert guards[1].last_started > drained
