"""The aiohttp application of the webhook sidecar: routes and the delivery handler.

Each delivery writes one log line carrying ``request_id`` (the sender's
``X-Request-Id`` when usable, see :func:`service.logs.request_id`) and, with
tracing on, sets ``authsvc.webhook.type`` and ``authsvc.webhook.outcome`` on its
server span (the labels of ``authsvc_webhook_deliveries_total``).
"""

from __future__ import annotations

import logging
import time
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from service import exposition
from service.errors import AuthError, InvalidArgument, PayloadTooLarge, status_of
from service.logs import REQUEST_ID_HEADER, fields, request_id
from service.metrics import WEBHOOK_DELIVERIES, WEBHOOK_DELIVERY_SECONDS
from service.settings import Settings
from service.tracing import annotate
from service.users import UserStore
from webhook.deliveries import apply, plan
from webhook.events import parse_event
from webhook.signatures import SignatureVerifier, header

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024  # 1 MiB

STORE = web.AppKey("store", UserStore)
VERIFIER = web.AppKey("verifier", SignatureVerifier)


class ClientGone(Exception):
    """The client closed the connection before its whole body arrived: nothing to answer."""


async def read_body(request: web.Request) -> bytes:
    """The raw (decompressed) body.

    Refused with :class:`PayloadTooLarge` past :data:`MAX_BODY` (also when a
    ``Content-Encoding`` inflates past it), :class:`InvalidArgument` when a
    ``Content-Encoding`` (gzip, deflate, br) does not decode; raises
    :class:`ClientGone` when the client disconnects mid-body.
    """
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge("body over 1 MiB")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge("body over 1 MiB") from exc
    except (web.RequestPayloadError, HttpProcessingError) as exc:
        # aiohttp decompresses while reading: a body that is not what its
        # Content-Encoding says (or an encoding it cannot decode) ends here.
        # Mark the body consumed, or aiohttp's lingering read after our 400
        # meets the same error again and logs it as unhandled.
        request.content.feed_eof()
        request.protocol.close()  # the rest of this stream is unusable: no keep-alive
        raise InvalidArgument("body does not decode per its Content-Encoding") from exc
    except ConnectionResetError as exc:
        raise ClientGone("client disconnected mid-body") from exc


async def receive(request: web.Request) -> web.Response:
    """POST the webhook path: verify, validate, apply; answer per the design's table."""
    started = time.perf_counter()
    line: dict[str, object] = {
        "svix_id": header(request.headers, "id"),
        "request_id": request_id(request.headers.get(REQUEST_ID_HEADER)),
        "type": None,
        "externalId": None,
    }
    try:
        body = await read_body(request)
        svix_id = request.app[VERIFIER].verify(body, request.headers)
        delivery = plan(svix_id, parse_event(body))
        line.update(type=delivery.type, externalId=delivery.external_id)
        outcome = await apply(request.app[STORE], delivery)
        status, payload = HTTPStatus.OK, {"status": outcome.value}
        line["outcome"] = outcome.value
    except AuthError as exc:
        status = status_of(exc)[1]
        payload = {"error": str(exc)}
        line.update(outcome="rejected", reason=exc.reason, error=str(exc))
    except ClientGone:
        # A client going away is not a server error: no traceback, nothing counted as one.
        line.update(outcome="client_gone", duration_ms=round((time.perf_counter() - started) * 1000, 2))
        annotate({"authsvc.webhook.type": str(line["type"] or "unknown"), "authsvc.webhook.outcome": "client_gone"})
        log.info("webhook delivery", extra=fields(**line))
        return web.Response(status=HTTPStatus.BAD_REQUEST)
    except Exception:
        log.exception("webhook delivery failed", extra=fields(**line))
        status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}
        line["outcome"] = "error"
    elapsed = time.perf_counter() - started
    kind, answered = str(line["type"] or "unknown"), str(line["outcome"])
    WEBHOOK_DELIVERIES.labels(kind, answered).inc()
    annotate({"authsvc.webhook.type": kind, "authsvc.webhook.outcome": answered})
    WEBHOOK_DELIVERY_SECONDS.observe(elapsed)
    line.update(status=int(status), duration_ms=round(elapsed * 1000, 2))
    log.info("webhook delivery", extra=fields(**line))
    return web.json_response(payload, status=status)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if await request.app[STORE].ping():
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "database unavailable"}, status=HTTPStatus.SERVICE_UNAVAILABLE)


def create_app(settings: Settings, store: UserStore) -> web.Application:
    """The sidecar's application; the caller owns ``store`` (and closes it)."""
    app = web.Application(client_max_size=MAX_BODY)
    app[STORE] = store
    app[VERIFIER] = SignatureVerifier(settings.webhook_secrets)
    app.router.add_post(settings.webhook_path, receive)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get(exposition.PATH, exposition.metrics)
    return app
