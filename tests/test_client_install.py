"""The client package alone, in a fresh venv: it installs with grpcio and protobuf only and makes a call.

pip resolves grpcio and protobuf as it would for a calling service (a local
wheel cache or the index); nothing of the server may come along.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

from service.roles import Role
from service.settings import Settings
from service.users import UserStore
from tests.grpc_helpers import seed, serve
from tests.issuer import LocalIssuer

ROOT = Path(__file__).resolve().parents[1]

CALLER = r"""
import asyncio, importlib.util, json, sys
from importlib import metadata

import authsvc_client
from authsvc_client import AuthsvcClient, PermissionDenied, Role

async def main(target, token):
    async with AuthsvcClient(target) as authsvc:
        identity = await authsvc.verify(token, Role.STAFF)
        try:
            await authsvc.verify(token, Role.SUPERADMIN)
            denied = None
        except PermissionDenied as exc:
            denied = exc.reason
    leaked = [name for name in ("service", "webhook", "protos", "pymongo", "aiohttp", "jwt", "svix", "pydantic",
                                "grpc_status", "google.rpc") if importlib.util.find_spec(name.split(".")[0]) and
              (name != "google.rpc" or importlib.util.find_spec(name))]
    installed = sorted(d.metadata["Name"].lower() for d in metadata.distributions())
    print(json.dumps({"subject": identity.subject, "role": identity.role.wire, "denied": denied,
                      "leaked": leaked, "installed": installed}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def install_client_alone(tmp: Path) -> Path:
    """A venv without pip holding only the wheel of clients/python and what it depends on; its python."""
    wheels, source = tmp / "wheels", tmp / "source"
    # Built from a copy: the build leaves build/ and *.egg-info behind it.
    shutil.copytree(ROOT / "clients/python", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
    )
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    python = venv / "bin/python"
    (wheel,) = wheels.glob("authsvc_client-*.whl")
    subprocess.run([*pip, "--python", str(python), "install", str(wheel)], check=True, capture_output=True)
    return python


async def test_a_fresh_venv_with_only_the_client_calls_authsvc(
    settings: Settings, store: UserStore, issuer: LocalIssuer, tmp_path: Path
) -> None:
    python = await asyncio.to_thread(install_client_alone, tmp_path)
    async with serve(settings, store, issuer) as h:
        await seed(h.store, "user_admin", Role.ADMIN)
        proc = await asyncio.create_subprocess_exec(
            str(python),
            "-c",
            CALLER,
            h.target,
            h.token("user_admin"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,  # not the repository: nothing importable from the checkout
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert (result["subject"], result["role"], result["denied"]) == ("user_admin", "admin", "ROLE_TOO_LOW")
    assert result["leaked"] == []
    assert set(result["installed"]) <= {
        "authsvc-client",
        "grpcio",
        "protobuf",
        "typing-extensions",
        "typing_extensions",
    }
