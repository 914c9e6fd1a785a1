"""The commands as an operator meets them: --version, --help with the settings each reads, startup refusals."""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from authsvc.cli import COMMANDS
from authsvc.dev.procs import child_env, free_port, run
from service.command import Command
from service.settings import Settings, describe
from tests.conftest import WEBHOOK_SECRET

AUTHSVC = str(Path(sys.executable).with_name("authsvc"))
ENTRY_POINTS = {
    "authsvc": [AUTHSVC],
    "python -m service": [sys.executable, "-m", "service"],
    "python -m webhook": [sys.executable, "-m", "webhook"],
}
PRODUCTION_DB = (
    "authsvc: MONGODB_URI is required with AUTHSVC_ENV=production (the embedded database is for development)"
)


def settings_table(help_text: str) -> list[tuple[str, str, str]]:
    """The rows of the settings table in ``--help`` output, header excluded."""
    lines = help_text.split("settings (environment variables", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    rows = []
    for line in lines:
        name, default, meaning = re.split(r"\s{2,}", line.strip(), maxsplit=2)
        rows.append((name, default, meaning))
    return rows


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
async def test_version(entry: str, tmp_path: Path) -> None:
    code, out, err = await run(*ENTRY_POINTS[entry], "--version", env=child_env(), cwd=tmp_path)
    assert (code, err) == (0, "")
    assert out.strip() == f"authsvc {version('authsvc')}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
async def test_help_lists_the_settings_the_command_reads(command: Command, tmp_path: Path) -> None:
    code, out, err = await run(AUTHSVC, command.name, "--help", env=child_env(), cwd=tmp_path)
    assert (code, err) == (0, "")
    assert out.startswith(f"usage: authsvc {command.name}")
    assert settings_table(out) == describe(command.reads)


def test_each_command_lists_what_it_needs_and_nothing_it_does_not() -> None:
    tables = {command.name: {name for name, _, _ in describe(command.reads)} for command in COMMANDS}
    assert {"CLERK_FRONTEND_API_URL", "CLERK_JWT_KEY", "AUTHSVC_GRPC_ADDR"} <= tables["grpc"]
    assert "CLERK_WEBHOOK_SECRET" not in tables["grpc"] and "AUTHSVC_WEBHOOK_ADDR" not in tables["grpc"]
    assert {"CLERK_WEBHOOK_SECRET", "AUTHSVC_WEBHOOK_ADDR", "AUTHSVC_DELETE_MODE"} <= tables["webhook"]
    assert "CLERK_FRONTEND_API_URL" not in tables["webhook"] and "AUTHSVC_GRPC_ADDR" not in tables["webhook"]
    # authsvc dev makes its own secret and issuer, and is always one process.
    assert {"AUTHSVC_GRPC_ADDR", "AUTHSVC_WEBHOOK_ADDR", "AUTHSVC_DATA_DIR"} <= tables["dev"]
    assert not {"CLERK_WEBHOOK_SECRET", "CLERK_FRONTEND_API_URL", "CLERK_JWT_KEY", "AUTHSVC_WORKERS"} & tables["dev"]


def test_every_setting_is_listed_by_some_command() -> None:
    listed = {name for command in COMMANDS for name in command.reads}
    assert listed == set(Settings.model_fields)


@pytest.mark.parametrize("package", ["service", "webhook"])
async def test_python_m_help_prints_help_instead_of_starting(package: str, tmp_path: Path) -> None:
    # Settings with which the process would start (and never end) if --help were ignored.
    env = child_env(
        CLERK_WEBHOOK_SECRET=WEBHOOK_SECRET,
        CLERK_FRONTEND_API_URL="http://127.0.0.1:9",
        AUTHSVC_WEBHOOK_ADDR=f"127.0.0.1:{free_port()}",
        AUTHSVC_GRPC_ADDR=f"127.0.0.1:{free_port()}",
    )
    code, out, err = await run(sys.executable, "-m", package, "--help", env=env, cwd=tmp_path, timeout_s=30)
    assert (code, err) == (0, "")
    assert out.startswith(f"usage: python -m {package} [-h] [--version]")
    assert "settings (environment variables" in out
    assert not (tmp_path / ".data").exists()


@pytest.mark.parametrize(
    ("argv", "required"),
    [
        (["grpc"], {"CLERK_FRONTEND_API_URL": "http://127.0.0.1:9"}),
        (["webhook"], {"CLERK_WEBHOOK_SECRET": WEBHOOK_SECRET}),
    ],
)
async def test_production_refuses_the_embedded_database(
    argv: list[str], required: dict[str, str], tmp_path: Path
) -> None:
    env = child_env(AUTHSVC_ENV="production", **required)
    code, out, err = await run(AUTHSVC, *argv, env=env, cwd=tmp_path)
    assert (code, out) == (2, "")
    assert err.splitlines() == [PRODUCTION_DB]
    assert not (tmp_path / ".data").exists()


async def test_dev_in_production_is_refused_before_anything_starts(tmp_path: Path) -> None:
    code, out, err = await run(AUTHSVC, "dev", env=child_env(AUTHSVC_ENV="production"), cwd=tmp_path)
    assert (code, out) == (2, "")
    assert err.splitlines() == ["authsvc: authsvc dev refuses to run with AUTHSVC_ENV=production"]
    assert not (tmp_path / ".data").exists()


async def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    # Invalid values from .env (with comments) and the environment, and requirements of the command, together.
    (tmp_path / ".env").write_text(
        "AUTHSVC_ENV=production   # no embedded database\n"
        "AUTHSVC_DELETE_MODE=shred # not a mode\n"
        "CLERK_FRONTEND_API_URL=clerk.example # no scheme\n"
    )
    env = child_env(AUTHSVC_CLOCK_SKEW_S="-1", AUTHSVC_TLS_KEY=str(tmp_path / "missing.pem"))
    code, out, err = await run(AUTHSVC, "grpc", env=env, cwd=tmp_path)
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert all(line.startswith("authsvc: ") for line in lines) and "Traceback" not in err
    # One line per variable: "CLERK_FRONTEND_API_URL ... is required" would repeat its invalid value's line.
    assert sorted(line.split()[1] for line in lines) == [
        "AUTHSVC_CLOCK_SKEW_S",
        "AUTHSVC_DELETE_MODE",
        "AUTHSVC_TLS_KEY",
        "CLERK_FRONTEND_API_URL",
        "MONGODB_URI",
    ]
