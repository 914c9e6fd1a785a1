"""Settings from the environment and .env: validated at start, one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings, SettingsError, load
from tests.conftest import WEBHOOK_SECRET


def test_defaults_match_the_design() -> None:
    s = load({}, dotenv=None)
    assert (s.mongodb_uri, s.mongodb_db, s.data_dir) == (None, "authsvc", Path(".data"))
    assert (s.grpc_addr, s.webhook_addr, s.webhook_path) == (
        "127.0.0.1:50051",
        "127.0.0.1:8080",
        "/clerk-users-webhook",
    )
    assert (s.delete_mode, s.clock_skew_s, s.clerk_api_url) == ("soft", 5, "https://api.clerk.com")


def test_dotenv_is_read_and_environment_wins(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"# comment\nMONGODB_DB=fromfile\nexport CLERK_WEBHOOK_SECRET='{WEBHOOK_SECRET}'\n")
    s = load({"MONGODB_DB": "fromenv"}, dotenv=dotenv)
    assert s.mongodb_db == "fromenv"
    assert s.webhook_secrets == (WEBHOOK_SECRET,)


def test_rotation_list_and_parties_are_split() -> None:
    other = "whsec_" + "A" * 40
    s = load(
        {
            "CLERK_WEBHOOK_SECRET": f"{WEBHOOK_SECRET} {other}",
            "CLERK_AUTHORIZED_PARTIES": "https://a.example, https://b.example/",
        },
        dotenv=None,
    )
    assert s.webhook_secrets == (WEBHOOK_SECRET, other)
    assert s.authorized_parties == ("https://a.example", "https://b.example")


def test_every_problem_is_reported_on_its_own_line() -> None:
    with pytest.raises(SettingsError) as info:
        load(
            {
                "CLERK_WEBHOOK_SECRET": "nope",
                "AUTHSVC_DELETE_MODE": "shred",
                "AUTHSVC_CLOCK_SKEW_S": "-1",
                "AUTHSVC_GRPC_ADDR": "nowhere",
                "CLERK_FRONTEND_API_URL": "clerk.example",
            },
            dotenv=None,
        )
    assert len(info.value.problems) == 5
    assert all("\n" not in p for p in info.value.problems)


def test_webhook_and_grpc_requirements() -> None:
    with pytest.raises(SettingsError, match="CLERK_WEBHOOK_SECRET is required"):
        Settings().check_webhook()
    with pytest.raises(SettingsError, match="CLERK_FRONTEND_API_URL"):
        Settings().check_grpc()
    Settings(frontend_api_url="https://clerk.example").check_grpc()
    assert (
        Settings(frontend_api_url="https://clerk.example/").resolved_jwks_url
        == "https://clerk.example/.well-known/jwks.json"
    )
