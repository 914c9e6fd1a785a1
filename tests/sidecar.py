"""Helpers to run the sidecar as production does, and to post Clerk events signed with the svix library."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import io
import json
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from authsvc.dev.events import signed_headers
from authsvc.dev.procs import ServerProcess, http_ok
from tests.conftest import WEBHOOK_SECRET

FIXTURES = Path(__file__).parent / "fixtures" / "clerk"


def raw_signed_headers(body: bytes, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    """Svix headers signing the raw bytes of ``body`` (Svix's scheme, computed here independently)."""
    msg_id, stamp = f"msg_{uuid.uuid4().hex}", str(int(time.time()))
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {"svix-id": msg_id, "svix-timestamp": stamp, "svix-signature": "v1," + base64.b64encode(mac).decode()}


def fixture(name: str, **data: Any) -> dict[str, Any]:
    """A Clerk event body from ``tests/fixtures/clerk`` with ``data`` fields overridden."""
    event: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    event = copy.deepcopy(event)
    event["data"].update(data)
    return event


class Sender:
    """Posts signed deliveries to one sidecar URL."""

    def __init__(self, session: aiohttp.ClientSession, url: str, secret: str) -> None:
        self.session, self.url, self.secret = session, url, secret

    async def post(
        self,
        event: Mapping[str, Any] | str | bytes,
        *,
        msg_id: str | None = None,
        secret: str | None = None,
        at: datetime | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        body = event if isinstance(event, str | bytes) else json.dumps(event)
        text = body.decode("latin-1") if isinstance(body, bytes) else body
        signed = signed_headers(secret or self.secret, text, msg_id, at=at)
        if headers is not None:
            signed = dict(headers)
        raw = body.encode() if isinstance(body, str) else body
        data: bytes | io.BytesIO = io.BytesIO(raw) if len(raw) > 512 * 1024 else raw
        async with self.session.post(self.url, data=data, headers=signed) as response:
            try:
                payload = await response.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                payload = {}
            return response.status, payload or {}


async def start_sidecar(env: dict[str, str], logfile: Path, port: int) -> ServerProcess:
    """``python -m webhook`` on ``127.0.0.1:port``, as production runs it, once ``/healthz`` answers."""
    process = ServerProcess(
        "sidecar",
        [sys.executable, "-m", "webhook"],
        env={**env, "AUTHSVC_WEBHOOK_ADDR": f"127.0.0.1:{port}"},
        logfile=logfile,
    )
    await process.start_ready(http_ok(f"http://127.0.0.1:{port}/healthz"))
    return process
