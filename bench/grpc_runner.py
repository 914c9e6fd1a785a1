"""``python -m bench.grpc_runner``: the gRPC service under test, as its own process.

The production path: settings read from the environment (``MONGODB_URI`` is
the benchmark's private database, ``CLERK_FRONTEND_API_URL`` points at a JWKS
served by this same process from the development issuer in
``BENCH_ISSUER_DIR``), then ``run_grpc``, exactly as ``authsvc grpc`` runs.
``grpc.health.v1.Health/Check``, already on that server, is the benchmark's
floor. SIGTERM stops everything.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aiohttp import web

from authsvc.dev.issuer import DevIssuer, jwks_routes
from service import logs
from service.app import run_grpc
from service.settings import Settings, load
from service.startup import split_addr


async def serve() -> None:
    settings = load(dotenv=None, check=Settings.check_grpc)
    logs.setup(settings.log_level)
    issuer = DevIssuer.load_or_create(Path(os.environ["BENCH_ISSUER_DIR"]))
    host, port = split_addr(os.environ["BENCH_JWKS_ADDR"])
    app = web.Application()
    app.add_routes(jwks_routes(issuer))
    jwks = web.AppRunner(app, access_log=None)
    await jwks.setup()
    await web.TCPSite(jwks, host, port).start()
    try:
        await run_grpc(settings)
    finally:
        await jwks.cleanup()


if __name__ == "__main__":
    asyncio.run(serve())
