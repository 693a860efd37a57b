"""Settings: the shipped config.toml, environment overrides, origins, errors that name the key and where
it was set, and `mp169 config check`."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import (
    COMMAND_LINE,
    DEFAULT,
    KEYS,
    ConfigError,
    Settings,
    env_name,
    load_configuration,
    load_settings,
)
from gateway.config_check import EXIT_INVALID
from simulator.recording import write_stream

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_config_is_the_defaults() -> None:
    assert load_settings(ROOT / "config.toml", environ={}) == Settings()


def test_the_environment_overrides_one_key_and_keeps_the_files_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[broker]\nurl = "mqtt://10.0.0.1:1883"\nkeepalive_seconds = 40\n')
    monkeypatch.setenv("MP169_BROKER__URL", "mqtts://broker.example:8883")
    settings = load_settings(config)
    assert settings.broker.url == "mqtts://broker.example:8883"
    assert settings.broker.keepalive_seconds == 40
    assert settings.broker.port == 8883
    assert settings.broker.ssl_context() is not None


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[broker]\nurl = "http://x"\n', "broker.url"),
        ("[broker]\nreconnect_min_seconds = 5\nreconnect_max_seconds = 1\n", "reconnect_min_seconds"),
        ('[gateway]\ndcc_eui = "not-an-eui"\n', "gateway.dcc_eui"),
        ("[gateway]\nno_such_key = 1\n", "gateway.no_such_key"),
        ("[gateway\n", "not valid TOML"),
        ('[store]\nurl = "mysql://db/mp169"\n', "store.url"),
        ('[topics]\nshared_group = "gw"\n', "topics.shared_group needs the PostgreSQL store"),
    ],
)
def test_a_bad_file_is_an_error_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_settings(config)


def test_a_missing_named_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_settings(tmp_path / "absent.toml")


def test_plain_mqtt_has_no_tls() -> None:
    assert Settings().broker.ssl_context() is None


@pytest.mark.parametrize(
    ("variable", "closest"),
    [
        ("MP169_BROKER__URI", "MP169_BROKER__URL"),
        ("MP169_BROKR__URL", "MP169_BROKER__URL"),
        ("MP169_STORE_PATH", "MP169_STORE__PATH"),
        ("MP169_BROKER", "MP169_BROKER__URL"),
    ],
)
def test_an_unknown_mp169_variable_is_an_error_naming_the_closest(variable: str, closest: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(ROOT / "config.toml", environ={variable: "mqtt://x:1"})
    assert raised.value.problems == (f"{variable}: no such setting (did you mean {closest}?)",)


def test_an_unknown_variable_far_from_any_setting_is_still_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^MP169_ZZZ: no such setting$"):
        load_settings(environ={"MP169_ZZZ": "1"})


def test_other_variables_are_not_settings() -> None:
    assert load_settings(ROOT / "config.toml", environ={"MP169X": "1", "HOME": "/root"}) == Settings()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[brokr]\nurl = "mqtt://x:1"\n', "[brokr]: no such section (did you mean broker?)"),
        ('[broker]\nuri = "mqtt://x:1"\n', "broker.uri: no such setting (did you mean broker.url?)"),
        ('broker = "mqtt://x:1"\n', "broker: must be a table ([broker])"),
    ],
)
def test_an_unknown_key_in_the_file_names_the_closest(tmp_path: Path, text: str, problem: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    assert raised.value.problems == (f"{config}: {problem}",)


def test_a_bad_value_names_the_variable_not_the_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[broker]\nkeepalive_seconds = 40\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(
            config, environ={"MP169_BROKER__URL": "http://x", "MP169_GATEWAY__INFLIGHT_WINDOW": "0"}
        )
    assert raised.value.problems == (
        "broker.url (from MP169_BROKER__URL): broker.url must look like mqtt://HOST:PORT or mqtts://HOST:PORT",
        (
            "gateway.inflight_window (from MP169_GATEWAY__INFLIGHT_WINDOW): Input should be greater than "
            "or equal to 1"
        ),
    )


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[gateway]\nno_such_key = 1\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={"MP169_BROKR__URL": "x"})
    assert len(raised.value.problems) == 2


def test_each_value_knows_where_it_came_from(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[broker]\nurl = "mqtt://file:1"\nkeepalive_seconds = 40\n[store]\npath = "a.db"\n')
    configuration = load_configuration(
        config,
        environ={"MP169_BROKER__URL": "mqtt://env:1", "mp169_store__path": "b.db"},
        overrides={"store.path": "c.db"},
    )
    assert configuration.settings.broker.url == "mqtt://env:1"
    assert configuration.settings.store.path == "c.db"
    assert configuration.origin("broker.url") == "MP169_BROKER__URL"
    assert configuration.origin("broker.keepalive_seconds") == str(config)
    assert configuration.origin("store.path") == COMMAND_LINE
    assert configuration.origin("topics.inbound") == DEFAULT
    assert configuration.file == config


def test_every_key_has_its_variable() -> None:
    for key in KEYS:
        section, name = key.split(".")
        value = str(getattr(getattr(Settings(), section), name) or "")
        if value:
            assert load_configuration(environ={env_name(key): value}).origin(key) == env_name(key)


def test_the_store_is_named_with_where_its_path_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    configuration = load_configuration(environ={})
    assert configuration.describe_store() == (
        f"{tmp_path / 'var' / 'mp169.sqlite3'} (store.path default, relative to the working directory "
        f"{tmp_path})"
    )
    assert configuration.describe_outcomes().startswith(
        f"{tmp_path / 'var' / 'mp169-outcomes.sqlite3'} (beside"
    )
    with pytest.raises(ConfigError, match=r"no store at .*`mp169 inventory import` creates a new one"):
        configuration.existing_store()
    assert configuration.existing_store(create=True) == tmp_path / "var" / "mp169.sqlite3"
    assert not (tmp_path / "var").exists()


def test_config_check_prints_toml_that_loads_back_to_the_same_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[broker]\nkeepalive_seconds = 40\nusername = "gw"\n')
    monkeypatch.setenv("MP169_TOPICS__INBOUND", "x/in")
    assert main(["config", "check", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert "configuration valid" in err
    assert f"# configuration file: {config}" in out
    assert "keepalive_seconds = 40  # " + str(config) in out
    assert 'inbound = "x/in"  # MP169_TOPICS__INBOUND' in out
    assert "# password: not set (default)" in out
    assert "# store: " in out
    assert "does not exist yet" in out
    printed = tmp_path / "printed.toml"
    printed.write_text(out)
    monkeypatch.delenv("MP169_TOPICS__INBOUND")
    assert load_settings(printed) == load_settings(config, environ={"MP169_TOPICS__INBOUND": "x/in"})


@pytest.mark.parametrize(
    ("variable", "value", "shown"),
    [
        ("MP169_BROKER__PASSWORD", "hunter2", ['password = "********"  # MP169_BROKER__PASSWORD']),
        (
            "MP169_STORE__URL",
            "postgresql://mp169:hunter2@db.example/mp169",
            [
                'url = "postgresql://mp169@db.example/mp169"  # MP169_STORE__URL',
                (
                    "# store: postgresql://mp169@db.example/mp169 (store.url from MP169_STORE__URL): "
                    "PostgreSQL, checked when a command connects"
                ),
            ],
        ),
    ],
)
def test_config_check_hides_passwords(
    variable: str,
    value: str,
    shown: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["config", "check", "--config", str(ROOT / "config.toml")]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    for line in shown:
        assert line in out


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        (
            "MP169_BROKR__URL",
            "mqtt://x:1",
            "MP169_BROKR__URL: no such setting (did you mean MP169_BROKER__URL?)",
        ),
        (
            "MP169_GATEWAY__RULES_PATH",
            "/nonexistent.toml",
            "gateway.rules_path (from MP169_GATEWAY__RULES_PATH)",
        ),
        (
            "MP169_BROKER__CA_FILE",
            "/nonexistent.pem",
            "broker.ca_file (from MP169_BROKER__CA_FILE): no such file",
        ),
    ],
)
def test_config_check_fails_on_what_would_fail_at_start(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    problem: str,
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["config", "check", "--config", str(ROOT / "config.toml")]) == EXIT_INVALID
    assert problem in capsys.readouterr().err


@pytest.mark.parametrize("command", [["run"], ["replay", "stream.jsonl"], ["flags", "show"]])
def test_commands_that_read_the_store_refuse_to_make_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no config.toml: the default store path, relative to here
    write_stream([], tmp_path / "stream.jsonl")
    assert main(command) == EXIT_INVALID
    assert f"no store at {tmp_path / 'var' / 'mp169.sqlite3'} (store.path default" in capsys.readouterr().err
    assert not (tmp_path / "var").exists()


def test_a_shared_group_with_the_postgresql_store_is_accepted(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[topics]\nshared_group = "gw"\n[store]\nurl = "postgresql://mp169:secret@db.example/mp169"\n'
    )
    settings = load_settings(config, environ={})
    assert settings.store.postgres
    assert settings.topics.shared_group == "gw"
    assert settings.store.name == "postgresql://mp169@db.example/mp169"  # never the password


def test_the_sqlite_store_is_the_default() -> None:
    assert not Settings().store.postgres
    assert Settings().store.name == Settings().store.path
