"""``python -m bench.grpc_runner``: the gRPC service under test, as its own process.

The production path: settings read from the environment (``MONGODB_URI`` is
the benchmark's private database, ``CLERK_FRONTEND_API_URL`` points at a JWKS
served by this same process from the development issuer in
``BENCH_ISSUER_DIR``), then ``open_store`` and ``start_grpc_stack``, as
``authsvc grpc`` does. ``grpc.health.v1.Health/Check``, already on that server,
is the benchmark's floor. SIGTERM stops everything.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aiohttp import web

from service import logs
from service.devissuer import DevIssuer, jwks_routes
from service.runtime import open_store, split_addr, start_grpc_stack, until_signalled
from service.settings import load


async def serve() -> None:
    settings = load(dotenv=None)
    settings.check_grpc()
    logs.setup(settings.log_level)
    issuer = DevIssuer.load_or_create(Path(os.environ["BENCH_ISSUER_DIR"]))
    host, port = split_addr(os.environ["BENCH_JWKS_ADDR"])
    app = web.Application()
    app.add_routes(jwks_routes(issuer))
    jwks = web.AppRunner(app, access_log=None)
    await jwks.setup()
    await web.TCPSite(jwks, host, port).start()
    try:
        database, store = await open_store(settings)
        try:
            stack = await start_grpc_stack(settings, store)
            try:
                await until_signalled()
            finally:
                await stack.stop()
        finally:
            await database.close()
    finally:
        await jwks.cleanup()


if __name__ == "__main__":
    asyncio.run(serve())
