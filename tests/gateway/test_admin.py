"""`mp169 inventory import`, `mp169 users import`, `mp169 flags show`, against a database in tmp_path."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
from typing import TYPE_CHECKING

import pytest

from gateway import admin
from gateway.cli import main
from gateway.pki import init_pki
from gateway.signing import PACKAGED_PKI
from gateway.store import CommitBatch, SqliteStore
from rules.domain import DeviceStatus, Eui, FlagEvent, Tariff
from simulator.estate import generate_estate, write_estate
from tests.gateway.test_inventory import (
    GAS_METER,
    IMPORT_SUPPLIER,
    METER,
    NEW_SUPPLIER,
    USERS,
    esme,
    inventory_csv,
    premise,
    users_csv,
)
from tests.gateway.test_store import AT

if TYPE_CHECKING:
    from pathlib import Path


def run(*argv: str) -> int:
    """The admin commands through their own register(), as gateway.cli wires them."""
    parser = argparse.ArgumentParser(prog="mp169")
    admin.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[store]\npath = "{(tmp_path / "var" / "gw.sqlite3").as_posix()}"\n', encoding="utf-8")
    return path


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "var" / "gw.sqlite3"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


async def _devices(path: Path) -> dict[Eui, object]:
    async with SqliteStore(path) as store:
        return {record.device_id: record async for batch in store.load_devices() for record in batch}


def test_inventory_import_creates_the_database_and_reports_counts(
    tmp_path: Path, config: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write(tmp_path, "inventory.csv", inventory_csv(premise()))
    assert run("inventory", "import", str(source), "--config", str(config)) == 0
    out, err = capsys.readouterr()
    assert "imported 3 devices" in out
    assert f"store {database} (store.path from {config})" in err
    assert f"created a new store at {database}" in err
    assert run("inventory", "import", str(source), "--config", str(config)) == 0
    assert "created" not in capsys.readouterr().err
    assert asyncio.run(_devices(database)) == {record.device_id: record for record in premise()}


def test_an_import_says_which_store_it_made_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no config.toml here: the default, relative store path
    assert main(["users", "import", str(write(tmp_path, "u.csv", users_csv(USERS)))]) == 0
    err = capsys.readouterr().err
    store = elsewhere / "var" / "mp169.sqlite3"
    assert f"store {store} (store.path default, relative to the working directory {elsewhere})" in err
    assert f"created a new store at {store}" in err


def test_reimport_upserts_change_of_supplier_and_tariff(
    tmp_path: Path, config: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(
        "inventory",
        "import",
        str(write(tmp_path, "a.csv", inventory_csv(premise()))),
        "--config",
        str(config),
    )
    capsys.readouterr()
    moved = esme(import_supplier=NEW_SUPPLIER, tariff=Tariff.ECONOMY7)
    source = write(tmp_path, "b.csv", inventory_csv([moved]))
    assert run("inventory", "import", str(source), "--config", str(config)) == 0
    assert "1 devices" in capsys.readouterr().out
    devices = asyncio.run(_devices(database))
    assert devices[METER] == moved
    assert len(devices) == 3


def test_a_bad_file_names_its_lines_and_imports_nothing(
    tmp_path: Path, config: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(
        "inventory",
        "import",
        str(write(tmp_path, "a.csv", inventory_csv(premise()))),
        "--config",
        str(config),
    )
    capsys.readouterr()
    text = inventory_csv([esme(status=DeviceStatus.SUSPENDED), *premise()[2:]])
    text = text.replace("GSME", "GASMETER") + "00-DB-12,ESME\n"
    source = write(tmp_path, "bad.csv", text)
    assert run("inventory", "import", str(source), "--config", str(config)) == 1
    err = capsys.readouterr().err
    assert "2 bad line(s); nothing imported" in err
    assert f"{source}:3: device_type: Input should be" in err
    assert f"{source}:4: expected 12 fields" in err
    # The good first line was not imported either.
    assert asyncio.run(_devices(database))[METER] == esme()


def test_a_missing_file_is_an_error(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("inventory", "import", str(tmp_path / "nope.csv"), "--config", str(config)) == 1
    assert "cannot read" in capsys.readouterr().err


def test_a_bad_config_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write(tmp_path, "a.csv", inventory_csv(premise()))
    assert run("inventory", "import", str(source), "--config", str(tmp_path / "missing.toml")) == 2
    assert "no such configuration file" in capsys.readouterr().err


def test_users_import(
    tmp_path: Path, config: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = write(tmp_path, "u.csv", users_csv(USERS))
    assert run("users", "import", str(users), "--config", str(config)) == 0
    output = capsys.readouterr()
    assert f"imported {len(USERS)} users" in output.out
    # The packaged library has DCC's test organisations only: each user is named as having none.
    assert f"certificates from {PACKAGED_PKI}: 0 of {len(USERS)} users have one" in output.out
    assert f"no certificate for {len(USERS)} user(s), whose requests are refused E16912" in output.err
    layout = init_pki(tmp_path / "pki", [user.user_id for user in USERS[:1]])
    with_certificates = write(
        tmp_path, "c.toml", config.read_text() + f'[signing]\ncertificates = "{layout.certificates}"\n'
    )
    assert run("users", "import", str(users), "--config", str(with_certificates)) == 0
    output = capsys.readouterr()
    assert f"1 of {len(USERS)} users have one" in output.out
    assert f"refused E16912: {', '.join(user.user_id for user in USERS[1:])}" in output.err
    bad = write(tmp_path, "bad.csv", "user_id,roles\n90-B3-D5-1F-30-01-00-01,SUPPLIER\n")
    assert run("users", "import", str(bad), "--config", str(config)) == 1
    assert f"{bad}:2: roles: unknown role 'SUPPLIER'" in capsys.readouterr().err

    async def load() -> set[Eui]:
        async with SqliteStore(database) as store:
            return {user.user_id for user in await store.load_users()}

    assert asyncio.run(load()) == {user.user_id for user in USERS}


def _flag_history(database: Path) -> None:
    async def commit() -> None:
        async with SqliteStore(database) as store:
            await store.upsert_devices(premise())
            events = [
                FlagEvent(METER, True, IMPORT_SUPPLIER, "r:1", True, "CR-1", "accepted", AT),
                FlagEvent(GAS_METER, True, IMPORT_SUPPLIER, "r:2", True, None, "E081509", AT),
            ]
            await store.commit(CommitBatch(flag_events=events))

    asyncio.run(commit())


def test_flags_show_json_for_one_device(
    config: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _flag_history(database)
    assert run("flags", "show", METER.lower(), "--json", "--config", str(config)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["device"]["responsible_supplier"] == IMPORT_SUPPLIER
    assert shown["flag"] == {
        "device_id": METER,
        "set_by": IMPORT_SUPPLIER,
        "set_at": AT.isoformat(),
        "request_id": "r:1",
        "consumer_reference": "CR-1",
    }
    assert [(e["action"], e["outcome"]) for e in shown["history"]] == [("set", "accepted")]


def test_flags_show_tables(
    config: Path, database: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at the terminal width, 80 when captured
    _flag_history(database)
    assert run("flags", "show", "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert "Devices with reduced communications: 1" in out
    assert "Refused: E081509 not-responsible-supplier" in out
    assert run("flags", "show", GAS_METER, "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert "Reduced communications: not set" in out
    assert "GSME SMETS2 Commissioned" in out


def test_flags_show_everything_as_json(
    config: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _flag_history(database)
    assert run("flags", "show", "--json", "--limit", "1", "--config", str(config)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [flag["device_id"] for flag in shown["flags"]] == [METER]
    assert [event["device_id"] for event in shown["history"]] == [GAS_METER]


def test_flags_show_refuses_a_bad_device_id_and_a_missing_database(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("flags", "show", "--config", str(config)) == admin.EXIT_USAGE
    assert "no store at" in capsys.readouterr().err
    assert run("flags", "show", "meter-1", "--config", str(config)) == 2
    assert "not an EUI-64" in capsys.readouterr().err


def test_through_the_mp169_console_script(
    tmp_path: Path, database: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MP169_STORE__PATH", str(database))
    monkeypatch.chdir(tmp_path)  # no config.toml here: defaults plus the environment
    assert main(["inventory", "import", str(write(tmp_path, "a.csv", inventory_csv(premise())))]) == 0
    assert "imported 3 devices" in capsys.readouterr().out
    assert main(["flags", "show", METER, "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["device"]["device_id"] == METER


def test_an_import_warns_about_unknown_comms_hubs_and_suppliers(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inventory, users = write_estate(generate_estate(5, 2), tmp_path / "estate")
    assert main(["inventory", "import", str(inventory), "--config", str(config)]) == 0
    warned = capsys.readouterr().err
    assert "reference(s) in the inventory name nothing known" in warned
    assert "import_supplier" in warned
    assert "is not a known user" in warned
    assert main(["users", "import", str(users), "--config", str(config)]) == 0
    assert "warning" not in capsys.readouterr().err, "every reference is known once both are imported"

    with inventory.open(encoding="utf-8", newline="") as lines:
        rows = list(csv.DictReader(lines))
    meter = next(row for row in rows if row["comms_hub_id"])
    meter["comms_hub_id"] = "00-DB-12-00-00-00-99-A2"
    moved = tmp_path / "moved.csv"
    with moved.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerow(meter)
    assert main(["inventory", "import", str(moved), "--config", str(config)]) == 0
    warned = capsys.readouterr().err
    assert f"{meter['device_id']}: comms_hub_id 00-DB-12-00-00-00-99-A2 is not in the inventory" in warned


def test_flags_show_of_a_device_nobody_knows_exits_non_zero(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inventory, _ = write_estate(generate_estate(5, 1), tmp_path / "estate")
    assert main(["inventory", "import", str(inventory), "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["flags", "show", "00-DB-12-00-00-00-99-A0", "--config", str(config)]) == 1
    assert "not in the inventory" in capsys.readouterr().err


def test_flags_show_cuts_nothing_in_an_80_column_terminal(
    config: Path, database: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def commit() -> None:
        async with SqliteStore(database) as store:
            await store.upsert_devices(premise())
            refused = FlagEvent(METER, True, IMPORT_SUPPLIER, "r:9", True, "CASE-2024-000123", "E081505", AT)
            await store.commit(CommitBatch(flag_events=[refused]))

    asyncio.run(commit())
    for columns in ("80", "50"):
        monkeypatch.setenv("COLUMNS", columns)
        for argv in (["flags", "show"], ["flags", "show", METER]):
            assert run(*argv, "--config", str(config)) == 0
            out = capsys.readouterr().out
            assert "…" not in out
            assert all(len(line) <= int(columns) for line in out.splitlines())
            for cell in ("E081505", "CASE-2024-000123", IMPORT_SUPPLIER):
                assert cell in out, (columns, argv, cell)


def test_import_and_flags_show_with_the_postgresql_store(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, "config.toml", f'[store]\nurl = "{postgres_url}"\n')
    source = write(tmp_path, "inventory.csv", inventory_csv(premise()))
    assert run("inventory", "import", str(source), "--config", str(config)) == 0
    out, err = capsys.readouterr()
    assert f"imported 3 devices from {source} into {postgres_url}" in out
    assert f"store {postgres_url} (store.url from {config})" in err
    assert "created" not in err
    assert (
        run("users", "import", str(write(tmp_path, "u.csv", users_csv(USERS))), "--config", str(config)) == 0
    )
    capsys.readouterr()
    assert run("flags", "show", METER, "--json", "--config", str(config)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["device"]["device_id"] == METER
    assert shown["flag"] is None
