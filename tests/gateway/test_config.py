"""Settings: the shipped config.toml, environment overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_config_is_the_defaults() -> None:
    assert load_settings(ROOT / "config.toml") == Settings()


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
