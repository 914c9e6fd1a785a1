"""Helpers to run the sidecar as production does, and to sign Clerk events with the svix library."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from authsvc.dev.events import signed_headers
from service.embedded import free_port

FIXTURES = Path(__file__).parent / "fixtures" / "clerk"


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


class SidecarProcess:
    """``python -m webhook`` as a child process on a free loopback port."""

    def __init__(self, env: dict[str, str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.env = {**env, "AUTHSVC_WEBHOOK_ADDR": f"127.0.0.1:{self.port}"}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "webhook"], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"sidecar exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}"
                    )
                try:
                    async with session.get(f"{self.base}/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError("sidecar did not start")

    def stop(self) -> str:
        """SIGTERM and wait; returns what it logged on stderr."""
        assert self.proc is not None
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return err.decode()
