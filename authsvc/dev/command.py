"""``authsvc dev``: its command and the settings it reads (it makes its own webhook secret and issuer)."""

from __future__ import annotations

from service.command import DATABASE, Command
from service.settings import Settings


async def _serve_dev(settings: Settings) -> None:
    from authsvc.dev.run import run

    await run(settings)


DEV = Command(
    name="dev",
    brief="both, on the embedded database, with a development issuer and secret",
    summary=(
        "Run the sidecar and the gRPC service in one process with a development issuer and webhook secret "
        "(kept under AUTHSVC_DATA_DIR/dev/), on the embedded database unless MONGODB_URI is set. "
        "Never in production: CLERK_WEBHOOK_SECRET and the CLERK_* issuer settings are replaced."
    ),
    reads=(
        *DATABASE,
        "webhook_addr",
        "webhook_path",
        "delete_mode",
        "grpc_addr",
        "authorized_parties",
        "jwt_audience",
        "clock_skew_s",
        "clerk_secret_key",
        "clerk_api_url",
        "jit_sync",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "drain_s",
        "metrics_addr",
        "webhook_metrics_addr",
        "sync_interval_s",
        "ext_authz",
        "accept_pending_sessions",
        "setrole_max_factor_age_min",
        "callers_file",
        "reflection",
        "stale_s",
        "max_connection_age_s",
        "log_rpcs",
    ),
    run=_serve_dev,
    check=Settings.check_dev,
    requires="AUTHSVC_ENV other than production",
    service_name="authsvc-dev",
)
