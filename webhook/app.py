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

from service import exposition
from service.dbmonitor import DatabaseMonitor
from service.errors import AuthError, status_of
from service.logs import REQUEST_ID_HEADER, fields, request_id
from service.metrics import WEBHOOK_DELIVERIES, WEBHOOK_DELIVERY_SECONDS
from service.settings import Settings
from service.tracing import annotate
from service.users import UserStore
from webhook.body import MAX_BODY, BodyTimeout, ClientGone, read_body
from webhook.deliveries import apply, plan
from webhook.events import parse_event
from webhook.limits import Limits
from webhook.signatures import SignatureVerifier, header

log = logging.getLogger(__name__)

STORE = web.AppKey("store", UserStore)
DATABASE = web.AppKey("database", DatabaseMonitor)  # set by the composition root: /readyz follows it
VERIFIER = web.AppKey("verifier", SignatureVerifier)
LIMITS = web.AppKey("limits", Limits)


async def receive(request: web.Request) -> web.Response:
    """POST the webhook path: verify, validate, apply; answer per the design's table."""
    started = time.perf_counter()
    line: dict[str, object] = {
        "svix_id": header(request.headers, "id"),
        "request_id": request_id(request.headers.get(REQUEST_ID_HEADER)),
        "type": None,
        "externalId": None,
    }
    body: bytes | None = None
    try:
        body = await read_body(request, request.app[LIMITS].body_timeout_s)
        svix_id = request.app[VERIFIER].verify(body, request.headers)
        delivery = plan(svix_id, parse_event(body))
        line.update(type=delivery.type, externalId=delivery.external_id)
        outcome = await apply(request.app[STORE], delivery)
        status, payload = HTTPStatus.OK, {"status": outcome.value}
        line["outcome"] = outcome.value
    except AuthError as exc:
        status = status_of(exc)[1]
        payload = {"error": str(exc)}
        # A 4xx is the delivery's fault (Svix gives up on it in the end); a 503 the database's (Svix retries).
        refused = "unavailable" if status == HTTPStatus.SERVICE_UNAVAILABLE else "rejected"
        line.update(outcome=refused, reason=exc.reason, error=str(exc))
    except BodyTimeout as exc:
        status, payload = HTTPStatus.REQUEST_TIMEOUT, {"error": str(exc)}
        line.update(outcome="rejected", error=str(exc))
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
    response = web.json_response(payload, status=status)
    if body is None:
        response.force_close()  # a body refused (too large, undecodable, late) is never read further
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    monitor = request.app.get(DATABASE)
    if monitor.up if monitor is not None else await request.app[STORE].ping():
        return web.json_response({"status": "ready"})
    # A public probe: ready or not, nothing about why.
    return web.json_response({"status": "not ready"}, status=HTTPStatus.SERVICE_UNAVAILABLE)


def create_app(settings: Settings, store: UserStore, limits: Limits) -> web.Application:
    """The sidecar's application; the caller owns ``store`` (and closes it).

    ``GET /metrics`` is served here unless ``AUTHSVC_WEBHOOK_METRICS_ADDR`` moves it off this address.
    """
    app = web.Application(client_max_size=MAX_BODY)
    app[STORE] = store
    app[VERIFIER] = SignatureVerifier(settings.webhook_secrets)
    app[LIMITS] = limits
    app.router.add_post(settings.webhook_path, receive)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if not settings.webhook_metrics_addr:
        app.router.add_get(exposition.PATH, exposition.metrics)
    return app
