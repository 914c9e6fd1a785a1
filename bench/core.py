"""In-process benchmarks of the per-call core: token verification against clerk-backend-api, and the interceptor.

- ``first-seen tokens``: authsvc's :class:`TokenVerifier` (RS256, a parsed key
  object kept, through its async ``verify``) against ``clerk_backend_api``'s
  ``verify_token`` with ``jwt_key`` (its networkless path), on the same distinct
  tokens, in the same process, passes interleaved; each verifier starts cold.
- ``repeated token``: one token verified again and again (authsvc answers from
  its result cache; Clerk's SDK has none).
- ``interceptor``: the CPU the metrics interceptor adds to one unary call
  (the wrapped handler around an empty one, its counters and histogram
  included), against the bare handler.
- ``session rules``: the revoked-session lookup every token check makes
  (:mod:`bench.sessions`).

Every figure is the median of the interleaved passes (authsvc and Clerk's SDK
swap places every other pass), timed in CPU seconds of this process
(``time.process_time``), so that other load on the machine counts less; each
ratio is the median of the per-pass ratios, with their spread.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from authsvc.dev.issuer import DevIssuer
from bench import sessions
from bench.common import Spread, pair_ratios, ratio_line
from service.grpcmetrics import MetricsInterceptor
from service.settings import Settings
from service.tokens import TokenVerifier

ISSUER = "https://clerk.bench.example"
AZP = "http://localhost:3000"


def _tokens(issuer: DevIssuer, count: int) -> list[str]:
    return [issuer.mint(f"user_{i:06d}", issuer=ISSUER, azp=AZP, ttl_s=3600) for i in range(count)]


async def _ours(settings: Settings, tokens: list[str]) -> float:
    verifier = TokenVerifier(settings)  # cold: nothing cached but the parsed key
    began = time.process_time()
    for token in tokens:
        await verifier.verify(token)
    return len(tokens) / (time.process_time() - began)


def _clerk(pem: str, tokens: list[str]) -> float:
    from clerk_backend_api.security import verify_token
    from clerk_backend_api.security.types import VerifyTokenOptions

    options = VerifyTokenOptions(jwt_key=pem, authorized_parties=[AZP])
    began = time.process_time()
    for token in tokens:
        verify_token(token, options)
    return len(tokens) / (time.process_time() - began)


class _Details:
    method = "/bench.Core/Empty"
    invocation_metadata = ()


class _Context:
    """The two methods of a ServicerContext the interceptor reads."""

    def code(self) -> None:
        return None


async def _calls_per_s(behavior: Callable[[Any, Any], Awaitable[Any]], count: int) -> float:
    context = _Context()
    began = time.process_time()
    for _ in range(count):
        await behavior(b"", context)
    return count / (time.process_time() - began)


async def _interceptor_cost(count: int) -> tuple[float, float]:
    """Calls per second of an empty unary handler, bare and as the metrics interceptor wraps it."""

    async def empty(request: Any, context: Any) -> bytes:
        return b""

    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(empty)

    async def continuation(details: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return handler

    interceptor = MetricsInterceptor()
    details: Any = _Details()

    async def intercepted(request: Any, context: Any) -> Any:
        wrapped = await interceptor.intercept_service(continuation, details)
        behavior: Any = wrapped.unary_unary if wrapped is not None else None
        return await behavior(request, context)

    bare = await _calls_per_s(empty, count)
    return bare, await _calls_per_s(intercepted, count)


async def run(*, tokens: int = 2000, passes: int = 6) -> list[str]:
    """The core figures and ratios, as printable lines."""
    issuer = DevIssuer.generate()
    pem = issuer.public_pem()
    distinct = _tokens(issuer, tokens)
    settings = Settings(jwt_key=pem, frontend_api_url=ISSUER, authorized_parties=(AZP,))
    one = distinct[:1] * tokens
    _clerk(pem, distinct[:50])  # imports and warms both paths
    await _ours(settings, distinct[:50])

    ours_first, clerk_first, ours_repeat, clerk_repeat, bare, wrapped = [], [], [], [], [], []
    for index in range(passes):
        # authsvc then Clerk's SDK, then the other way round: A B B A across two passes.
        if index % 2 == 0:
            ours_first.append(await _ours(settings, distinct))
            clerk_first.append(_clerk(pem, distinct))
        else:
            clerk_first.append(_clerk(pem, distinct))
            ours_first.append(await _ours(settings, distinct))
        verifier = TokenVerifier(settings)
        await verifier.verify(one[0])
        began = time.process_time()
        for token in one:
            await verifier.verify(token)
        ours_repeat.append(len(one) / (time.process_time() - began))
        clerk_repeat.append(_clerk(pem, one))
        b, w = await _interceptor_cost(20_000)
        bare.append(b)
        wrapped.append(w)

    med = statistics.median
    per_call_us = (1 / med(wrapped) - 1 / med(bare)) * 1e6
    return [
        f"core: {tokens} distinct tokens x {passes} interleaved passes (A B B A), per CPU second: median (min-max, n)",
        f"  first-seen: authsvc {Spread(ours_first).text()}/s, clerk-backend-api verify_token "
        f"{Spread(clerk_first).text()}/s",
        f"  repeated:   authsvc {Spread(ours_repeat).text()}/s, clerk-backend-api verify_token "
        f"{Spread(clerk_repeat).text()}/s",
        f"  metrics interceptor: {per_call_us:.1f} us of CPU per call "
        f"(empty handler {med(bare):,.0f}/s bare, {med(wrapped):,.0f}/s wrapped)",
        ratio_line("first-seen authsvc / clerk", pair_ratios(ours_first, clerk_first), 1.2),
        ratio_line("repeated authsvc / clerk", pair_ratios(ours_repeat, clerk_repeat), 20),
        *sessions.run(),
    ]


if __name__ == "__main__":
    print("\n".join(asyncio.run(run())))
