"""Settings: config.toml validated into one typed model, every key overridable from the environment.

Environment overrides use the prefix MP169_ and "__" between levels (MP169_BROKER__URL,
MP169_STORE__PATH) and win over the file. An unknown key or a bad value in the file is an error
naming the key, raised before anything starts.
"""

from __future__ import annotations

import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from rules.domain import DCC_EUI, parse_eui

DEFAULT_CONFIG_PATH = Path("config.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSettings(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    keepalive_seconds: Annotated[int, Field(ge=5, le=3600)] = 30
    session_expiry_seconds: Annotated[int, Field(ge=0)] = 3600
    reconnect_min_seconds: Annotated[float, Field(gt=0)] = 0.5
    reconnect_max_seconds: Annotated[float, Field(gt=0)] = 30.0
    ca_file: str = ""
    """For mqtts://: the CA bundle that signs the broker's certificate; empty: the system's."""

    @model_validator(mode="after")
    def _backoff_bounds(self) -> BrokerSettings:
        if self.reconnect_min_seconds > self.reconnect_max_seconds:
            raise ValueError("broker.reconnect_min_seconds must not exceed broker.reconnect_max_seconds")
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=self.ca_file or None)

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname:
            raise ValueError("broker.url must look like mqtt://HOST:PORT or mqtts://HOST:PORT")
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"


class TopicSettings(_Section):
    inbound: str = "dsp/in"
    """Requests arrive on <inbound>/<user-eui>."""
    outbound: str = "dsp/out"
    """Responses and alerts leave on <outbound>/<user-eui>."""
    devices: str = "dsp/device"
    """Commands go to <devices>/<device-eui>/cmd; devices answer on <devices>/<device-eui>/up."""
    deadletter: str = "dsp/deadletter"
    shared_group: str = ""
    """Non-empty: subscribe as MQTT 5 shared subscription $share/<group>/... (several gateways)."""


class GatewaySettings(_Section):
    client_id: str = "mp169-gateway-1"
    dcc_eui: str = DCC_EUI
    """The DCC's own EUI: the target of non-device requests (CommandVariant 8)."""
    max_message_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    inflight_window: Annotated[int, Field(ge=1, le=65535)] = 1000
    target_response_seconds: Annotated[float, Field(gt=0)] = 30.0
    rules_path: str = ""
    """Empty: the rules table packaged with the gateway (rules/table.toml)."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9169
    """Prometheus endpoint on 127.0.0.1; 0 turns it off."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("dcc_eui")
    @classmethod
    def _eui(cls, value: str) -> str:
        return parse_eui(value)


class StoreSettings(_Section):
    path: str = "var/mp169.sqlite3"


class OutcomeSettings(_Section):
    path: str = ""
    """Outcome records' SQLite file; empty: beside the store, `<store stem>-outcomes.sqlite3`. A file of
    its own, so the recorder's batch writes never hold the lock the routing commits need."""
    batch_size: Annotated[int, Field(ge=1)] = 500
    flush_seconds: Annotated[float, Field(gt=0)] = 0.5
    retention_days: Annotated[int, Field(ge=1)] = 400


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MP169_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    broker: BrokerSettings = BrokerSettings()
    topics: TopicSettings = TopicSettings()
    gateway: GatewaySettings = GatewaySettings()
    store: StoreSettings = StoreSettings()
    outcomes: OutcomeSettings = OutcomeSettings()

    @property
    def outcomes_path(self) -> Path:
        if self.outcomes.path:
            return Path(self.outcomes.path)
        store = Path(self.store.path)
        return store.with_name(f"{store.stem}-outcomes{store.suffix}")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],  # noqa: ARG003
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file's values, which arrive as init arguments.
        return (env_settings, init_settings)


class ConfigError(Exception):
    """The configuration file or an override is invalid; the message names the key."""


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read `path` (default ./config.toml, if present), apply MP169_ overrides, validate."""
    source = path if path is not None else DEFAULT_CONFIG_PATH
    data: dict[str, Any] = {}
    if source.exists():
        try:
            data = tomllib.loads(source.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    elif path is not None:
        raise ConfigError(f"{source}: no such configuration file")
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_problems(exc)}") from exc


def validation_problems(exc: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    """A pydantic error as one line, `key: problem; key: problem`, each key dotted after `prefix`."""

    def key(location: tuple[int | str, ...]) -> str:
        return ".".join((*prefix, *(str(part) for part in location)))

    return "; ".join(f"{key(error['loc'])}: {error['msg']}" for error in exc.errors())
