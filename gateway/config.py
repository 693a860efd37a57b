"""Settings: config.toml validated into one typed model, every key overridable from the environment.

Layers, each overriding the one before: the defaults, the file (./config.toml or `--config`), the
environment (`MP169_<SECTION>__<KEY>`: MP169_BROKER__URL, MP169_STORE__PATH), the command line. Every
value remembers which layer it came from (`mp169 config check` prints them). An unknown key, in the
file or as an MP169_ variable, is an error naming the closest valid one; a bad value is an error naming
the key and where it was set. Both are raised before anything starts.

The environment is read here rather than through pydantic-settings, which ignores an MP169_ variable
that names no section and cannot say where a value came from.
"""

from __future__ import annotations

import difflib
import os
import ssl
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rules.domain import DCC_EUI, parse_eui

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

DEFAULT_CONFIG_PATH = Path("config.toml")
DEMO_STORE_PATH = Path("var/demo/mp169.sqlite3")
"""Where `mp169 demo` leaves its store (and its outcomes beside it) for `mp169 report`."""
ENV_PREFIX = "MP169_"
_ENV_DELIMITER = "__"
DEFAULT = "default"
COMMAND_LINE = "command line"
SECRET_KEYS = frozenset({"broker.password"})


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
    inbound_sessions: Annotated[int, Field(ge=1, le=64)] = 1
    """Broker sessions the Users' requests arrive on (`mp169 run`): above 1, each User's inbound topic
    goes to one of them by a hash of its EUI, and the gateway takes them round-robin, so one User's
    burst waits in its own session's queue (gateway/inbound.py)."""
    target_response_seconds: Annotated[float, Field(gt=0)] = 30.0
    max_forwards_per_user: Annotated[int, Field(ge=1)] = 2_000
    """Requests of one User awaiting their device's answer; more are answered E16921 (busy) at once."""
    max_forwards: Annotated[int, Field(ge=1)] = 20_000
    """Requests of all Users awaiting their device's answer; more are answered E16921 (busy) at once."""
    rules_path: str = ""
    """Empty: the rules table packaged with the gateway (rules/table.toml)."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9169
    """Prometheus endpoint on 127.0.0.1; 0 turns it off."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    stop_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    """SIGTERM: drain this long (running handlers, the broker's acknowledgements), then exit."""

    @field_validator("dcc_eui")
    @classmethod
    def _eui(cls, value: str) -> str:
        return parse_eui(value)


class StoreSettings(_Section):
    path: str = "var/mp169.sqlite3"
    """The embedded SQLite store (one gateway instance); used when `url` is empty."""
    url: str = ""
    """postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE: the PostgreSQL store, shared by several
    instances (libpq's URL form; PGPASSWORD and ~/.pgpass work too). Empty: SQLite at `path`."""
    retry_seconds: Annotated[float, Field(ge=0)] = 30.0
    """A busy or locked store is retried (capped backoff) this long before the batch fails (E16920)."""
    lease_seconds: Annotated[float, Field(ge=1, le=300)] = 10.0
    """PostgreSQL: an instance's lease; one that stops renewing it is waited for at most this long
    by a flag request's answer, and stops deciding before it lapses (docs/multi-instance.md)."""

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in {"postgresql", "postgres"}:
            raise ValueError("store.url must be empty (SQLite) or look like postgresql://HOST/DATABASE")
        return value

    @property
    def postgres(self) -> bool:
        return bool(self.url)

    @property
    def name(self) -> str:
        """Where the store is, for messages and logs: the SQLite path, or the URL without its password."""
        if not self.postgres:
            return self.path
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}@{host}"))


class OutcomeSettings(_Section):
    path: str = ""
    """Outcome records' SQLite file; empty: beside the store, `<store stem>-outcomes.sqlite3`. A file of
    its own, so the recorder's batch writes never hold the lock the routing commits need. Not used with
    the PostgreSQL store: every instance records into its database."""
    batch_size: Annotated[int, Field(ge=1)] = 500
    flush_seconds: Annotated[float, Field(gt=0)] = 0.5
    retention_days: Annotated[int, Field(ge=1)] = 400


class SigningSettings(_Section):
    """XML signatures (gateway/signing.py). Empty paths: the packaged DCC Boxed test material
    (rules/duis/smki-test/), so DCC's sample users verify out of the box."""

    certificates: str = ""
    """Directory of organisation certificates (*.pem): the certificate library requests are verified by."""
    dsp_key: str = ""
    """The DSP's XML-signing private key (PKCS#8, DER or PEM): every document sent to users is signed."""
    dsp_certificate: str = ""
    """The certificate of `dsp_key`: its issuer and serial go in each signature's KeyInfo."""
    verify: bool = True
    """False skips request verification (benchmarks only): the daemon warns at start and a metric shows it."""
    processes: Annotated[int, Field(ge=0, le=64)] = 0
    """0: sign and verify in a thread pool of the gateway's process; N: in N worker processes."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: BrokerSettings = BrokerSettings()
    topics: TopicSettings = TopicSettings()
    gateway: GatewaySettings = GatewaySettings()
    store: StoreSettings = StoreSettings()
    outcomes: OutcomeSettings = OutcomeSettings()
    signing: SigningSettings = SigningSettings()

    @model_validator(mode="after")
    def _shared_group_needs_postgres(self) -> Settings:
        if self.topics.shared_group and not self.store.postgres:
            raise ValueError(
                'topics.shared_group needs the PostgreSQL store (store.url = "postgresql://..."): '
                "instances sharing the subscription over SQLite files of their own would disagree on "
                "flags and RequestIDs, and MP169's guarantee would not hold (docs/multi-instance.md)"
            )
        return self

    @property
    def outcomes_path(self) -> Path:
        if self.outcomes.path:
            return Path(self.outcomes.path)
        store = Path(self.store.path)
        return store.with_name(f"{store.stem}-outcomes{store.suffix}")


def _sections() -> dict[str, type[BaseModel]]:
    sections: dict[str, type[BaseModel]] = {}
    for name, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type)
        assert issubclass(model, BaseModel)
        sections[name] = model
    return sections


SECTIONS = _sections()
KEYS = tuple(f"{section}.{key}" for section, model in SECTIONS.items() for key in model.model_fields)
"""Every setting, as `section.key`, in the order of the model (and of config.toml)."""


def env_name(key: str) -> str:
    """`broker.url` -> `MP169_BROKER__URL`."""
    section, name = key.split(".")
    return f"{ENV_PREFIX}{section.upper()}{_ENV_DELIMITER}{name.upper()}"


_ENV_KEYS = {env_name(key): key for key in KEYS}


class ConfigError(Exception):
    """The configuration file or an override is invalid; each problem names the key and its origin."""

    def __init__(self, *problems: str) -> None:
        self.problems = problems
        super().__init__("; ".join(self.problems))


def _closest(name: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


@dataclass(frozen=True, slots=True)
class Configuration:
    """The validated settings, and where each value came from."""

    settings: Settings
    origins: Mapping[str, str]
    """`section.key` -> DEFAULT, the configuration file's path, an MP169_ variable, or COMMAND_LINE."""
    file: Path | None
    """The configuration file read, if any."""

    def origin(self, key: str) -> str:
        return self.origins.get(key, DEFAULT)

    def value(self, key: str) -> object:
        section, name = key.split(".")
        return getattr(getattr(self.settings, section), name)

    @property
    def store_path(self) -> Path:
        return Path(self.settings.store.path).absolute()

    @property
    def outcomes_path(self) -> Path:
        return self.settings.outcomes_path.absolute()

    def _where(self, key: str) -> str:
        origin = self.origin(key)
        if origin == DEFAULT:
            return f"{key} default, relative to the working directory {Path.cwd()}"
        return f"{key} from {origin}"

    @property
    def store_name(self) -> str:
        """The SQLite store's absolute path, or the PostgreSQL URL without its password."""
        store = self.settings.store
        return store.name if store.postgres else str(self.store_path)

    def describe_store(self) -> str:
        """Which store a command uses, and why: `/abs/var/mp169.sqlite3 (store.path from config.toml)`."""
        key = "store.url" if self.settings.store.postgres else "store.path"
        return f"{self.store_name} ({self._where(key)})"

    @property
    def outcomes_location(self) -> Path | str:
        """Where outcomes are recorded: the PostgreSQL store's URL (every instance's, one database),
        else the SQLite outcome file."""
        return self.settings.store.url if self.settings.store.postgres else self.outcomes_path

    def describe_outcomes(self) -> str:
        if self.settings.store.postgres:
            return f"in the store {self.describe_store()}"
        if self.settings.outcomes.path:
            return f"{self.outcomes_path} ({self._where('outcomes.path')})"
        return f"{self.outcomes_path} (beside the store, {self._where('store.path')})"

    def existing_store(self, *, create: bool = False) -> Path:
        """The SQLite store's path; unless `create`, a ConfigError if there is no store there, so that a
        command run from the wrong directory never works on (or makes) a new empty store."""
        path = self.store_path
        # PostgreSQL: connecting says whether the database is there; the path is not used.
        if not self.settings.store.postgres and not create and not path.exists():
            raise ConfigError(
                f"no store at {self.describe_store()}: run from the directory that holds it, or set "
                f"store.path (--config FILE, {env_name('store.path')}); `mp169 inventory import` "
                "creates a new one"
            )
        return path


def _read_file(path: Path | None) -> tuple[Path | None, dict[str, Any]]:
    source = path if path is not None else DEFAULT_CONFIG_PATH
    if not source.exists():
        if path is not None:
            raise ConfigError(f"{source}: no such configuration file")
        return None, {}
    try:
        return source, tomllib.loads(source.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc


def _file_layer(source: Path, data: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """The file's `section.key` values; unknown sections and keys are problems naming the closest."""
    values: dict[str, Any] = {}
    for section, table in data.items():
        if section not in SECTIONS:
            problems.append(f"{source}: [{section}]: no such section{_closest(section, SECTIONS)}")
        elif not isinstance(table, dict):
            problems.append(f"{source}: {section}: must be a table ([{section}])")
        else:
            for name, value in table.items():
                key = f"{section}.{name}"
                if key in KEYS:
                    values[key] = value
                else:
                    problems.append(f"{source}: {key}: no such setting{_closest(key, KEYS)}")
    return values


def _environment_layer(environ: Mapping[str, str], problems: list[str]) -> dict[str, tuple[str, str]]:
    """`section.key` -> (variable, value) for every MP169_ variable; any other MP169_ name is a problem,
    so a misspelt override never goes unnoticed."""
    values: dict[str, tuple[str, str]] = {}
    for variable, value in sorted(environ.items()):
        if not variable.upper().startswith(ENV_PREFIX):
            continue
        key = _ENV_KEYS.get(variable.upper())
        if key is None:
            problems.append(f"{variable}: no such setting{_closest(variable.upper(), _ENV_KEYS)}")
        else:
            values[key] = (variable, value)
    return values


def _problem(error: Mapping[str, Any], origins: Mapping[str, str]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if key in KEYS:
        return f"{key} (from {origins.get(key, DEFAULT)}): {message}"
    # A check across a section's keys (reconnect bounds): name where each of them was set.
    set_here = sorted({origin for name, origin in origins.items() if name.startswith(f"{key}.")})
    return f"{key} (from {', '.join(set_here) or DEFAULT}): {message}"


def load_configuration(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Configuration:
    """Read `path` (default ./config.toml, if present), apply the MP169_ variables of `environ` (default
    os.environ) and the `section.key` command-line `overrides`, validate. Every problem is collected
    into one ConfigError."""
    problems: list[str] = []
    source, data = _read_file(path)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if source is not None:
        for key, value in _file_layer(source, data, problems).items():
            values[key], origins[key] = value, str(source)
    for key, (variable, value) in _environment_layer(
        os.environ if environ is None else environ, problems
    ).items():
        values[key], origins[key] = value, variable
    for key, value in (overrides or {}).items():
        if key not in KEYS:
            raise ValueError(f"no such setting {key!r}")  # a programming error, not the user's
        values[key], origins[key] = value, COMMAND_LINE
    if problems:
        raise ConfigError(*problems)
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    try:
        settings = Settings.model_validate(nested)
    except ValidationError as exc:
        raise ConfigError(*(_problem(error, origins) for error in exc.errors())) from exc
    return Configuration(settings, origins, source)


def load_settings(
    path: Path | None = None, *, environ: Mapping[str, str] | None = None, **overrides: Mapping[str, Any]
) -> Settings:
    """The settings of `load_configuration`, without their origins; `overrides` by section
    (`broker={"url": ...}`), from the command line."""
    return load_configuration(path, environ=environ, overrides=flat_overrides(overrides)).settings


def flat_overrides(overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """`{"broker": {"url": u}}` -> `{"broker.url": u}`."""
    return {
        f"{section}.{key}": value for section, values in overrides.items() for key, value in values.items()
    }


def validation_problems(exc: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    """A pydantic error as one line, `key: problem; key: problem`, each key dotted after `prefix`."""

    def key(location: tuple[int | str, ...]) -> str:
        return ".".join((*prefix, *(str(part) for part in location)))

    return "; ".join(f"{key(error['loc'])}: {error['msg']}" for error in exc.errors())
