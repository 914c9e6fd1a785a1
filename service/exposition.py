"""``GET /metrics``: the Prometheus text of this process, or of every worker when they share a metrics directory.

With ``PROMETHEUS_MULTIPROC_DIR`` set (worker processes), each scrape sums the
files of every worker there (prometheus_client's multiprocess mode); without
it, the process's own registry answers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

from service import listen
from service.startup import StartupError, split_addr

PATH = "/metrics"


def render() -> bytes:
    """The Prometheus text format of every metric (summed over the workers in multiprocess mode)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


async def metrics(request: web.Request) -> web.Response:
    """The ``GET /metrics`` handler (the sidecar adds it to its routes)."""
    return web.Response(body=render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


@contextlib.asynccontextmanager
async def metrics_server(addr: str, setting: str = "AUTHSVC_METRICS_ADDR") -> AsyncIterator[int]:
    """Serve ``GET /metrics`` on ``addr`` (the value of ``setting``) until the block exits; yields the bound port."""
    app = web.Application()
    app.router.add_get(PATH, metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        port = split_addr(addr)[1]
        try:
            await listen.site(runner, addr).start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {addr} ({setting}): {exc.strerror}") from exc
        yield runner.addresses[0][1] if runner.addresses else port
    finally:
        await runner.cleanup()
