"""Settings from the environment and .env: validated at start, one line per problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import Settings, SettingsError, describe, load
from tests.conftest import WEBHOOK_SECRET
from tests.test_docs import contract_setting_rows


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


def test_dotenv_comments_after_values_are_not_part_of_them(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "MONGODB_DB=fromfile # the database\n"
        "AUTHSVC_CLOCK_SKEW_S=10\t# seconds\n"
        "CLERK_AUTHORIZED_PARTIES=https://a.example,https://b.example  # two origins\n"
        'CLERK_JWT_AUDIENCE="aud # with a hash"  # quoted: the hash is part of the value\n'
        "AUTHSVC_JIT_SYNC=off # a switch\n"
    )
    s = load({}, dotenv=dotenv)
    assert s.mongodb_db == "fromfile"
    assert s.clock_skew_s == 10
    assert s.authorized_parties == ("https://a.example", "https://b.example")
    assert s.jwt_audience == "aud # with a hash"
    assert s.jit_sync is False


def test_invalid_values_and_missing_requirements_are_reported_together() -> None:
    with pytest.raises(SettingsError) as info:
        load(
            {"AUTHSVC_ENV": "production", "AUTHSVC_LOG_LEVEL": "loud", "AUTHSVC_WEBHOOK_PATH": "hook"},
            dotenv=None,
            check=Settings.check_webhook,
        )
    problems = info.value.problems
    assert [p.split()[0] for p in problems] == [
        "AUTHSVC_WEBHOOK_PATH",
        "AUTHSVC_LOG_LEVEL",
        "CLERK_WEBHOOK_SECRET",
        "MONGODB_URI",
    ], problems


def test_a_requirement_on_an_invalid_value_is_not_reported_twice() -> None:
    with pytest.raises(SettingsError) as info:
        load({"CLERK_WEBHOOK_SECRET": "nope"}, dotenv=None, check=Settings.check_webhook)
    assert info.value.problems == ["CLERK_WEBHOOK_SECRET must start with 'whsec_'"]


def test_production_refuses_the_embedded_database_for_every_command() -> None:
    env = {
        "AUTHSVC_ENV": "Production",
        "CLERK_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "CLERK_FRONTEND_API_URL": "https://c.example",
    }
    for check in (Settings.check_webhook, Settings.check_grpc, Settings.check_dev):
        with pytest.raises(SettingsError) as info:
            load(env, dotenv=None, check=check)
        assert len(info.value.problems) == 1 and "AUTHSVC_ENV=production" in info.value.problems[0]
    load({**env, "MONGODB_URI": "mongodb://db.example"}, dotenv=None, check=Settings.check_grpc)


def test_describe_shows_switches_as_on_and_off() -> None:
    assert describe(["jit_sync", "ext_authz", "mongodb_uri", "data_dir"]) == [
        ("AUTHSVC_JIT_SYNC", "on", Settings.model_fields["jit_sync"].description),
        ("AUTHSVC_EXT_AUTHZ", "off", Settings.model_fields["ext_authz"].description),
        ("MONGODB_URI", "unset", Settings.model_fields["mongodb_uri"].description),
        ("AUTHSVC_DATA_DIR", ".data", Settings.model_fields["data_dir"].description),
    ]


def test_help_shows_each_default_as_the_contract_writes_it() -> None:
    # Every row of the contract's settings table whose default is one literal (`2`, `false`, `0` (off)):
    # `authsvc CMD --help` shows that literal, so an operator reads the same value in both.
    one_name, one_literal = re.compile(r"`([A-Z_]+)`"), re.compile(r"`([^`]+)`(?: \(off\))?")
    written = {}
    for name, default, *_ in contract_setting_rows():
        named, literal = one_name.fullmatch(name), one_literal.fullmatch(default)
        if named and literal:
            written[named[1]] = literal[1]
    shown = {variable: default for variable, default, _ in describe(Settings.model_fields)}
    assert len(written) >= 20
    assert {v: (d, shown.get(v)) for v, d in written.items() if shown.get(v) != d} == {}


@pytest.mark.parametrize("value", ["prod", "staging", "dev", "productoin"])
def test_an_environment_other_than_development_or_production_is_a_problem(value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load({"AUTHSVC_ENV": value}, dotenv=None)
    assert info.value.problems == [f"AUTHSVC_ENV input should be 'development' or 'production', got {value!r}"], (
        info.value.problems
    )


def test_environment_names_are_case_insensitive() -> None:
    assert load({"AUTHSVC_ENV": "Development"}, dotenv=None).production is False
    assert load({"AUTHSVC_ENV": "PRODUCTION", "MONGODB_URI": "mongodb://db.example"}, dotenv=None).production


def test_auto_workers_is_the_cpus_this_process_may_use() -> None:
    from service.cpus import available_cpus

    assert load({"AUTHSVC_WORKERS": "auto"}, dotenv=None).workers == available_cpus()
    assert load({"AUTHSVC_WORKERS": "3"}, dotenv=None).workers == 3


def test_log_rpcs_takes_all_errors_or_off() -> None:
    assert load({}, dotenv=None).log_rpcs == "all"
    assert load({"AUTHSVC_LOG_RPCS": "Errors"}, dotenv=None).log_rpcs == "errors"
    with pytest.raises(SettingsError) as info:
        load({"AUTHSVC_LOG_RPCS": "some"}, dotenv=None)
    assert info.value.problems == ["AUTHSVC_LOG_RPCS input should be 'all', 'errors' or 'off', got 'some'"]
