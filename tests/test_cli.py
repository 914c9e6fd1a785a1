"""The `authsvc` command line as a newcomer uses it: `authsvc dev`, then the banner's commands."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from protos.authsvc.v1 import authsvc_pb2, authsvc_pb2_grpc
from service.embedded import free_port
from tests.conftest import WEBHOOK_SECRET, subprocess_env

AUTHSVC = str(Path(sys.executable).with_name("authsvc"))
GRPCURL = str(Path(sys.executable).with_name("grpcurl"))


async def run(*args: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class DevProcess:
    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.webhook_port, self.grpc_port = free_port(), free_port()
        self.env = subprocess_env(
            AUTHSVC_WEBHOOK_ADDR=f"127.0.0.1:{self.webhook_port}",
            AUTHSVC_GRPC_ADDR=f"127.0.0.1:{self.grpc_port}",
        )
        self.proc: subprocess.Popen[str] | None = None
        self.banner = ""

    def start(self, timeout_s: float = 60) -> None:
        self.proc = subprocess.Popen(
            [AUTHSVC, "dev"], cwd=self.cwd, env=self.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"authsvc dev exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            lines.append(line)
            if line.startswith("Ctrl-C stops it"):
                self.banner = "".join(lines)
                return
        raise RuntimeError("authsvc dev printed no banner")

    def stop(self) -> tuple[int, str]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


@pytest.fixture
async def dev(tmp_path: Path) -> AsyncIterator[DevProcess]:
    process = DevProcess(tmp_path)
    await asyncio.to_thread(process.start)
    yield process
    if process.proc is not None and process.proc.poll() is None:
        process.stop()


async def test_dev_flow_end_to_end(dev: DevProcess, tmp_path: Path) -> None:
    grpc_addr = f"127.0.0.1:{dev.grpc_port}"
    assert grpc_addr in dev.banner and "whsec_" in dev.banner
    assert "authsvc dev-webhook user.created --id user_1 --role superadmin" in dev.banner
    assert "authsvc dev-token user_1" in dev.banner

    code, out, _ = await run(
        AUTHSVC,
        "dev-webhook",
        "user.created",
        "--id",
        "user_1",
        "--role",
        "superadmin",
        "--email",
        "ada@example.com",
        "--first-name",
        "Ada",
        env=dev.env,
        cwd=tmp_path,
    )
    assert code == 0 and json.loads(out.split(" ", 1)[1]) == {"status": "applied"}
    code, out, _ = await run(AUTHSVC, "dev-webhook", "user.created", "--id", "user_2", env=dev.env, cwd=tmp_path)
    assert code == 0

    code, token, _ = await run(AUTHSVC, "dev-token", "user_1", env=dev.env, cwd=tmp_path)
    token = token.strip()
    assert code == 0 and token.count(".") == 2

    async with grpc.aio.insecure_channel(grpc_addr) as channel:
        stub = authsvc_pb2_grpc.AuthServiceStub(channel)
        reply = await stub.VerifyToken(
            authsvc_pb2.VerifyTokenRequest(token=token, min_role=authsvc_pb2.ROLE_SUPERADMIN)
        )
        assert reply.subject == "user_1"
        assert reply.user.email == "ada@example.com" and reply.user.name == "Ada"
        assert reply.user.role == authsvc_pb2.ROLE_SUPERADMIN
        assert reply.authorized_party == "http://localhost:3000"

    # The banner's grpcurl calls, as a newcomer would paste them.
    code, out, err = await run(GRPCURL, "-plaintext", grpc_addr, "list", env=dev.env, cwd=tmp_path)
    assert code == 0 and "authsvc.v1.AuthService" in out, err
    request = json.dumps({"external_id": "user_2", "role": "ROLE_ADMIN"})
    code, out, err = await run(
        GRPCURL,
        "-plaintext",
        "-H",
        f"authorization: Bearer {token}",
        "-d",
        request,
        grpc_addr,
        "authsvc.v1.AuthService/SetRole",
        env=dev.env,
        cwd=tmp_path,
    )
    assert code == 0, err
    assert json.loads(out)["role"] == "ROLE_ADMIN"

    code, err = dev.stop()
    assert code == 0
    assert token not in err  # the token never reaches the logs
    assert "Traceback" not in err


async def test_dev_refuses_production(tmp_path: Path) -> None:
    env = subprocess_env(AUTHSVC_ENV="production")
    code, _, err = await run(AUTHSVC, "dev", env=env, cwd=tmp_path)
    assert code == 2
    assert err.strip() == "authsvc: authsvc dev refuses to run with AUTHSVC_ENV=production"
    assert not (tmp_path / ".data" / "mongo").exists()


async def test_dev_token_without_dev_issuer_says_what_to_do(tmp_path: Path) -> None:
    code, out, err = await run(AUTHSVC, "dev-token", "user_1", env=subprocess_env(), cwd=tmp_path)
    assert code == 1 and out == "" and "run `authsvc dev` first" in err


async def test_grpc_refuses_to_start_without_an_issuer(tmp_path: Path) -> None:
    code, _, err = await run(sys.executable, "-m", "service", env=subprocess_env(), cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "CLERK_FRONTEND_API_URL" in lines[0]


async def test_missing_embedded_extra_exits_2_with_one_line(tmp_path: Path) -> None:
    # As if `authsvc[embedded]` were not installed: the import system finds no secantus.
    script = "import sys; sys.modules['secantus'] = None; from authsvc.cli import main; sys.exit(main(['webhook']))"
    env = subprocess_env(CLERK_WEBHOOK_SECRET=WEBHOOK_SECRET, AUTHSVC_WEBHOOK_ADDR=f"127.0.0.1:{free_port()}")
    code, _, err = await run(sys.executable, "-c", script, env=env, cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "MONGODB_URI" in lines[0] and "authsvc[embedded]" in lines[0]


async def test_dotenv_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CLERK_WEBHOOK_SECRET=not-a-secret\n")
    code, _, err = await run(AUTHSVC, "webhook", env=subprocess_env(), cwd=tmp_path)
    assert code == 2 and "must start with 'whsec_'" in err
