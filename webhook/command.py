"""``authsvc webhook`` (and ``python -m webhook``): the sidecar's command and the settings it reads."""

from __future__ import annotations

from service.command import DATABASE, Command
from service.settings import Settings


async def _serve(settings: Settings) -> None:
    from service.workers import serve
    from webhook.main import run_webhook

    await serve("webhook", run_webhook, settings)


WEBHOOK = Command(
    name="webhook",
    brief="serve the Clerk webhook sidecar on AUTHSVC_WEBHOOK_ADDR",
    summary="Serve the Clerk webhook sidecar (Svix-signed user.* and session.* events) on AUTHSVC_WEBHOOK_ADDR.",
    reads=(
        *DATABASE,
        "webhook_secrets",
        "webhook_addr",
        "webhook_path",
        "delete_mode",
        "workers",
        "webhook_metrics_addr",
        "sync_interval_s",
        "clerk_secret_key",
        "clerk_api_url",
    ),
    run=_serve,
    check=Settings.check_webhook,
    requires="CLERK_WEBHOOK_SECRET; MONGODB_URI when AUTHSVC_ENV=production",
    service_name="authsvc-webhook",
)
