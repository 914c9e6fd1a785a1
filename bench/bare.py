"""``python -m bench.bare PORT REPLIES [--interceptor]``: the floor of the VerifyToken benchmark.

A bare one-process grpc.aio server (authsvc's server options) serving
``/authsvc.v1.AuthService/VerifyToken`` with no serialization at all: the
request bytes are looked up in ``REPLIES`` (a JSON object of hex request ->
hex reply, recorded from the real service) and the recorded reply bytes are
sent. ``--interceptor`` adds authsvc's metrics interceptor, to measure its cost.
SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import grpc

from service.server import server_options

METHOD = "/authsvc.v1.AuthService/VerifyToken"


class _Replies(grpc.GenericRpcHandler):
    def __init__(self, replies: dict[bytes, bytes]) -> None:
        async def verify(request: bytes, context: Any) -> bytes:
            return replies[request]

        self._handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(verify)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handler if handler_call_details.method == METHOD else None


async def serve(port: int, replies: dict[bytes, bytes], interceptor: bool) -> None:
    interceptors = []
    if interceptor:
        from service.grpcmetrics import MetricsInterceptor

        interceptors.append(MetricsInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=server_options(False))
    server.add_generic_rpc_handlers((_Replies(replies),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("port", type=int)
    parser.add_argument("replies", type=Path)
    parser.add_argument("--interceptor", action="store_true")
    args = parser.parse_args()
    recorded = json.loads(args.replies.read_text())
    asyncio.run(serve(args.port, {bytes.fromhex(k): bytes.fromhex(v) for k, v in recorded.items()}, args.interceptor))
