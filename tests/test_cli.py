"""The `authsvc` command line as a newcomer uses it: `authsvc dev`, then the banner's commands."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from authsvc.cli import main
from authsvc.dev.events import Changes, merge
from authsvc.dev.procs import ServerProcess, child_env, free_port, printed, run
from authsvc.dev.run import session_claims
from authsvc_client.v1 import authsvc_pb2, authsvc_pb2_grpc
from tests.conftest import WEBHOOK_SECRET

AUTHSVC = str(Path(sys.executable).with_name("authsvc"))
GRPCURL = str(Path(sys.executable).with_name("grpcurl"))


@dataclass
class Dev:
    """A running ``authsvc dev`` in its own working directory."""

    process: ServerProcess
    env: dict[str, str]
    cwd: Path
    grpc_addr: str

    @property
    def banner(self) -> str:
        return self.process.output()


@pytest.fixture
async def dev(tmp_path: Path) -> AsyncIterator[Dev]:
    webhook_port, grpc_port = free_port(), free_port()
    env = child_env(
        AUTHSVC_WEBHOOK_ADDR=f"127.0.0.1:{webhook_port}",
        AUTHSVC_GRPC_ADDR=f"127.0.0.1:{grpc_port}",
    )
    process = ServerProcess("authsvc dev", [AUTHSVC, "dev"], env=env, logfile=tmp_path / "dev.log", cwd=tmp_path)
    await process.start_ready(printed("Ctrl-C stops it"), timeout_s=90)  # a loaded CI machine starts slowly
    try:
        yield Dev(process, env, tmp_path, f"127.0.0.1:{grpc_port}")
    finally:
        process.stop()


async def test_dev_flow_end_to_end(
    dev: Dev, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    grpc_addr = dev.grpc_addr
    assert grpc_addr in dev.banner and "whsec_" in dev.banner
    assert "authsvc dev-webhook user.created --id user_1 --role superadmin" in dev.banner
    assert "authsvc dev-token user_1" in dev.banner
    assert "anyone (set AUTHSVC_CALLERS_FILE to require caller keys)" in dev.banner  # so grpcurl needs no -H

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

    # Sessions, as the banner shows them: a token with Clerk's session claims, then its session revoked.
    # (The console script's own code, run in this process: each child process costs seconds on a loaded machine.)
    assert "authsvc dev-webhook session.revoked --id user_1 --sid sess_demo" in dev.banner
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTHSVC_DATA_DIR", str(tmp_path / ".data"))
    argv = ["dev-token", "user_1", "--sid", "sess_demo", "--act", "user_support", "--fva", "3,0"]
    assert await asyncio.to_thread(main, argv) == 0
    demo = capsys.readouterr().out.strip()
    async with grpc.aio.insecure_channel(grpc_addr) as channel:
        stub = authsvc_pb2_grpc.AuthServiceStub(channel)
        reply = await stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=demo))
        fva = json_format.MessageToDict(reply.claims)["fva"]
        assert (reply.session_id, reply.actor, fva) == ("sess_demo", "user_support", [3, 0])
        argv = ["dev-webhook", "session.revoked", "--id", "user_1", "--sid", "sess_demo"]
        assert await asyncio.to_thread(main, argv) == 0
        assert json.loads(capsys.readouterr().out.split(" ", 1)[1]) == {"status": "applied"}
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            for _ in range(100):  # the revocation reaches the set within moments (the 1 s bound is tested elsewhere)
                await stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=demo))
                await asyncio.sleep(0.01)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in (refused.value.details() or "")

    assert dev.process.stop(signal.SIGINT) == 0  # Ctrl-C
    err = dev.process.output()
    assert token not in err  # the token never reaches the logs
    assert "Traceback" not in err


async def test_dev_refuses_production(tmp_path: Path) -> None:
    env = child_env(AUTHSVC_ENV="production")
    code, _, err = await run(AUTHSVC, "dev", env=env, cwd=tmp_path)
    assert code == 2
    assert err.strip() == "authsvc: authsvc dev refuses to run with AUTHSVC_ENV=production"
    assert not (tmp_path / ".data" / "mongo").exists()


async def test_dev_token_without_dev_issuer_says_what_to_do(tmp_path: Path) -> None:
    code, out, err = await run(AUTHSVC, "dev-token", "user_1", env=child_env(), cwd=tmp_path)
    assert code == 1 and out == "" and "run `authsvc dev` first" in err


async def test_grpc_refuses_to_start_without_an_issuer(tmp_path: Path) -> None:
    code, _, err = await run(sys.executable, "-m", "service", env=child_env(), cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "CLERK_FRONTEND_API_URL" in lines[0]


async def test_missing_embedded_extra_exits_2_with_one_line(tmp_path: Path) -> None:
    # As if `authsvc[embedded]` were not installed: the import system finds no secantus.
    script = "import sys; sys.modules['secantus'] = None; from authsvc.cli import main; sys.exit(main(['webhook']))"
    env = child_env(CLERK_WEBHOOK_SECRET=WEBHOOK_SECRET, AUTHSVC_WEBHOOK_ADDR=f"127.0.0.1:{free_port()}")
    code, _, err = await run(sys.executable, "-c", script, env=env, cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "MONGODB_URI" in lines[0] and "authsvc[embedded]" in lines[0]


async def test_dotenv_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CLERK_WEBHOOK_SECRET=not-a-secret\n")
    code, _, err = await run(AUTHSVC, "webhook", env=child_env(), cwd=tmp_path)
    assert code == 2 and "must start with 'whsec_'" in err


async def get_user(grpc_addr: str, user_id: str) -> authsvc_pb2.User:
    async with grpc.aio.insecure_channel(grpc_addr) as channel:
        stub = authsvc_pb2_grpc.AuthServiceStub(channel)
        user: authsvc_pb2.User = await stub.GetUser(authsvc_pb2.GetUserRequest(external_id=user_id), timeout=10)
        return user


async def test_dev_webhook_update_keeps_what_it_is_not_given(dev: Dev) -> None:
    async def dev_webhook(*args: str) -> tuple[int, str, str]:
        return await run(AUTHSVC, "dev-webhook", *args, env=dev.env, cwd=dev.cwd)

    code, _, err = await dev_webhook(
        "user.created", "--id", "user_1", "--role", "superadmin", "--email", "ada@example.com",
        "--first-name", "Ada", "--last-name", "Lovelace",
    )  # fmt: skip
    assert code == 0, err

    code, out, err = await dev_webhook("user.updated", "--id", "user_1", "--first-name", "Augusta")
    assert code == 0 and json.loads(out.split(" ", 1)[1]) == {"status": "applied"}, (out, err)
    assert "keeps from the dev database: role superadmin, email ada@example.com" in err
    assert "last name 'Lovelace'" in err
    user = await get_user(dev.grpc_addr, "user_1")
    assert (user.name, user.email, user.role) == ("Augusta Lovelace", "ada@example.com", authsvc_pb2.ROLE_SUPERADMIN)

    code, _, err = await dev_webhook("user.updated", "--id", "user_1", "--role", "admin")
    assert code == 0, err
    assert "email ada@example.com, name 'Augusta Lovelace'" in err and "role" not in err.split("keeps")[1]
    user = await get_user(dev.grpc_addr, "user_1")
    assert (user.name, user.email, user.role) == ("Augusta Lovelace", "ada@example.com", authsvc_pb2.ROLE_ADMIN)

    # A user the dev database does not hold: said, then sent as given.
    code, _, err = await dev_webhook("user.updated", "--id", "user_9", "--first-name", "Grace")
    assert code == 0 and "user_9 is not in the dev database" in err

    # With the dev service gone, an update is refused rather than sent blind.
    assert dev.process.stop() == 0
    code, out, err = await dev_webhook("user.updated", "--id", "user_1", "--first-name", "Ada")
    assert code == 1 and out == ""
    assert "cannot read user_1" in err and "nothing was overwritten" in err


def test_merge_keeps_the_other_half_of_the_name() -> None:
    held = authsvc_pb2.User(
        external_id="user_1", name="Ada Lovelace", email="a@example.com", role=authsvc_pb2.ROLE_STAFF
    )
    merged, kept = merge(Changes(last_name="King"), held)
    assert merged == Changes(role="staff", email="a@example.com", first_name="Ada", last_name="King")
    assert kept == ["role staff", "email a@example.com", "first name 'Ada' (from the stored name 'Ada Lovelace')"]
    merged, kept = merge(Changes(first_name="Grace", last_name="Hopper", email="g@example.com"), held)
    assert merged == Changes(role="staff", email="g@example.com", first_name="Grace", last_name="Hopper")
    assert kept == ["role staff"]


def test_dev_webhook_session_end_needs_a_session_id(capsys: pytest.CaptureFixture[str]) -> None:
    for event in ("session.revoked", "session.ended", "session.removed"):
        with pytest.raises(SystemExit) as info:
            main(["dev-webhook", event, "--id", "user_1"])
        assert info.value.code == 2 and f"{event} needs --sid" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["dev-token", "user_1", "--fva", "3"])
    assert info.value.code == 2 and "FIRST,SECOND" in capsys.readouterr().err


def test_dev_token_session_claims() -> None:
    claims = session_claims(actor="user_support", pending=True, fva=[3, -1])
    assert (claims["act"]["sub"], claims["sts"], claims["fva"]) == ("user_support", "pending", [3, -1])
    assert claims["act"]["sid"].startswith("sess_") and session_claims() == {}
