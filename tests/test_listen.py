"""A wildcard IPv6 bind (``[::]:PORT``) serves IPv4 clients too, on both aiohttp listeners (sidecar, /metrics)."""

from __future__ import annotations

import aiohttp

from service.exposition import metrics_server
from service.settings import Settings
from service.users import UserStore
from webhook.main import sidecar


async def answers(port: int, path: str) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as session:
        for host in ("127.0.0.1", "[::1]"):
            async with session.get(f"http://{host}:{port}{path}") as response:
                statuses.append(response.status)
    return statuses


async def test_the_sidecar_on_ipv6_wildcard_accepts_ipv4_and_ipv6(settings: Settings, store: UserStore) -> None:
    async with sidecar(settings.model_copy(update={"webhook_addr": "[::]:0"}), store) as port:
        assert await answers(port, "/healthz") == [200, 200]


async def test_metrics_on_ipv6_wildcard_accept_ipv4_and_ipv6() -> None:
    async with metrics_server("[::]:0") as port:
        assert await answers(port, "/metrics") == [200, 200]
