"""The client package alone, in a fresh venv, at its floors: it installs with grpcio and protobuf only and makes calls.

grpcio and protobuf are installed at exactly the lower bounds that
``clients/python/pyproject.toml`` declares (the oldest a calling service may
have), from a local wheel cache or the index; nothing of the server may come
along. The project's own environment covers the newest versions.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tomllib
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

import grpc
import authsvc_client
from authsvc_client import AuthsvcClient, PermissionDenied, Role
from authsvc_client.interceptor import AuthInterceptor

async def main(target, token):
    async with AuthsvcClient(target) as authsvc:
        identity = await authsvc.verify(token, Role.STAFF)
        try:
            await authsvc.verify(token, Role.SUPERADMIN)
            denied = None
        except PermissionDenied as exc:
            denied = exc.reason
        grpc.aio.server(interceptors=[AuthInterceptor(authsvc, default=Role.STAFF)])
    leaked = [name for name in ("service", "webhook", "protos", "pymongo", "aiohttp", "jwt", "svix", "pydantic",
                                "grpc_status", "google.rpc") if importlib.util.find_spec(name.split(".")[0]) and
              (name != "google.rpc" or importlib.util.find_spec(name))]
    installed = sorted(f'{d.metadata["Name"].lower()}=={d.version}' for d in metadata.distributions())
    print(json.dumps({"subject": identity.subject, "role": identity.role.wire, "denied": denied,
                      "leaked": leaked, "installed": installed}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def floors() -> list[str]:
    """``name==version`` for each ``name>=version`` dependency of the client package."""
    project = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())["project"]
    pins = []
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(,<[0-9.]+)?", requirement)
        assert match, f"the client's dependencies are floors: {requirement}"
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def install_client_alone(tmp: Path) -> Path:
    """A venv without pip holding only the wheel of clients/python and its dependencies at their floors; its python."""
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
    subprocess.run(
        [*pip, "--python", str(python), "install", "--only-binary", ":all:", str(wheel), *floors()],
        check=True,
        capture_output=True,
    )
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
    installed = {line.partition("==")[0]: line for line in result["installed"]}
    # six: grpcio's own dependency before 1.53
    assert set(installed) <= {"authsvc-client", "grpcio", "protobuf", "six", "typing-extensions", "typing_extensions"}
    assert sorted(installed[pin.partition("==")[0]] for pin in floors()) == sorted(floors())
