"""The rules table: the packaged file is complete and right, and every kind of bad edit is refused."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from rules.domain import Role
from rules.table import (
    ALWAYS_FLOWING,
    PACKAGED_TABLE,
    SRV_MATRIX,
    Category,
    TableError,
    default_table,
    load_table,
)

SCHEMA = Path(__file__).parents[2] / "rules" / "duis" / "schema" / "DUIS Schema V5.4.xsd"
XS = "{http://www.w3.org/2001/XMLSchema}"

# docs/mp169.md section 4, written out: the SRVs refused for a flagged device.
DESIGN_REFUSED = {
    "4.1.1", "4.1.2", "4.1.3", "4.1.4", "4.2",
    "4.3", "4.18",
    "4.4.2", "4.4.3", "4.4.4", "4.4.5",
    "4.6.1", "4.6.2",
    "4.8.1", "4.8.2", "4.8.3",
    "4.10",
    "4.12.1", "4.12.2",
    "4.14", "4.15", "4.16", "4.17",
    "14.1",
}  # fmt: skip


def _codes(*spans: tuple[int, int]) -> set[str]:
    return {f"{code:04X}" for first, last in spans for code in range(first, last + 1)}


# docs/mp169.md section 4, alert lists.
DESIGN_SECURITY = _codes(
    (0x8F1E, 0x8F1E), (0x8F30, 0x8F30), (0x8F3D, 0x8F3F), (0x8F53, 0x8F53), (0x8F60, 0x8F60),
    (0x8F70, 0x8F70), (0x8F73, 0x8F78), (0x8F47, 0x8F4F),
)  # fmt: skip
DESIGN_SAFETY_SUPPLY = _codes(
    (0x8F32, 0x8F34), (0x8F83, 0x8F83), (0x81A0, 0x81A0), (0x81B4, 0x81B6), (0x81BD, 0x81C0)
)
DESIGN_POWER_OUTAGE = _codes((0x8F35, 0x8F3C)) | {"AD1"}
DESIGN_FIRMWARE = _codes((0x8F1B, 0x8F1C), (0x8F43, 0x8F43), (0x8F72, 0x8F72), (0x8F89, 0x8F8B))
DESIGN_FUTURE_DATED = {"8F66", "8F67"}


def _matrix() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(SRV_MATRIX.read_text(encoding="utf-8"))
    return rows


# -- the packaged table ------------------------------------------------------------------------------


def test_packaged_table_loads_once():
    table = default_table()
    assert table is default_table()
    assert table.srvs.keys() == load_table(PACKAGED_TABLE).srvs.keys()


def test_covers_exactly_the_matrix_srvs_and_the_flag_requests():
    matrix_srvs = {row["Service Reference Variant"] for row in _matrix()}
    assert len(matrix_srvs) == 129
    assert set(default_table().srvs) == matrix_srvs | {"8.15.1", "8.15.2"}


def test_srv_rows_copy_the_matrix():
    table = default_table()
    for row in _matrix():
        rule = table.srvs[row["Service Reference Variant"]]
        assert rule.name == " ".join(row["Service Request Name"].split())
        assert rule.critical is (row["Critical"] == "Yes")
        assert rule.non_device is (row["Non-Device Request"] == "Yes")
        assert rule.dcc_scheduled is (row["DCC Scheduled"] == "Yes")
        assert rule.eligible_roles == {Role(role) for role in row["Eligible User Roles"]}
        assert rule.rationale


def test_refused_srvs_are_exactly_design_section_2():
    refused = {srv for srv, rule in default_table().srvs.items() if rule.refused_when_flagged}
    assert refused == DESIGN_REFUSED
    assert not default_table().srvs["5.1"].refused_when_flagged


def test_flag_requests_rows():
    for srv in ("8.15.1", "8.15.2"):
        rule = default_table().srvs[srv]
        assert rule.service_reference == "8.15"
        assert rule.non_device
        assert not rule.critical
        assert not rule.refused_when_flagged
        assert rule.category is Category.CONSUMER_CHOICE_FLAG
        assert rule.eligible_roles == set(Role)


def test_service_references_match_the_real_samples():
    """The matrix prints 6.2 for 6.20.x; DUIS and the samples say 6.20, and so does the table."""
    table = default_table()
    assert table.srvs["6.20.1"].service_reference == "6.20"
    assert table.srvs["6.20.2"].service_reference == "6.20"
    for srv, rule in table.srvs.items():
        assert srv == rule.service_reference or srv.startswith(rule.service_reference + ".")


def test_no_alert_is_withheld_and_only_8f0a_is_redacted():
    alerts = default_table().alerts
    assert {code for code, rule in alerts.items() if rule.withheld_when_flagged} == set()
    assert {code for code, rule in alerts.items() if rule.redacted_when_flagged} == {"8F0A"}


@pytest.mark.parametrize(
    ("codes", "categories"),
    [
        (DESIGN_SECURITY, {Category.SECURITY}),
        (DESIGN_SAFETY_SUPPLY, {Category.SAFETY, Category.SUPPLY}),
        (DESIGN_POWER_OUTAGE, {Category.POWER_OUTAGE}),
        (DESIGN_FIRMWARE, {Category.FIRMWARE}),
        (DESIGN_FUTURE_DATED, {Category.SCHEDULE}),
    ],
    ids=["security", "safety-supply", "power-outage", "firmware", "future-dated"],
)
def test_design_alert_lists_have_their_category(codes, categories):
    table = default_table()
    for code in codes:
        rule = table.alerts[code]
        assert rule.category in categories, code
        assert not rule.withheld_when_flagged, code


def test_power_outage_alerts_notify_the_network_operator():
    table = default_table()
    assert all(table.alerts[code].notify_network_operator for code in DESIGN_POWER_OUTAGE)
    assert not table.alerts["8F0A"].notify_network_operator


def test_every_dcc_alert_code_of_the_schema_is_classified():
    schema = etree.parse(str(SCHEMA))
    element = schema.find(f".//{XS}complexType[@name='DCCAlertMessage']//{XS}element[@name='DCCAlertCode']")
    assert element is not None
    codes = {node.get("value") for node in element.iter(f"{XS}enumeration")}
    assert {"AD1", "N1", "N65", "N999"} <= codes
    assert codes <= set(default_table().alerts)


def test_alert_codes_are_upper_case_and_looked_up_in_any_case():
    table = default_table()
    assert all(code == code.upper() for code in table.alerts)
    assert table.alert("8f0a") is table.alert("8F0A") is table.alerts["8F0A"]
    assert table.alert("FFFF") is None
    assert table.srv("4.8.1") is table.srvs["4.8.1"]
    assert table.srv("99.9") is None


def test_table_is_read_only():
    table = default_table()
    with pytest.raises(TypeError):
        table.srvs["9.9"] = table.srvs["4.8.1"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        table.srvs = {}  # type: ignore[misc]


# -- bad tables are refused, naming the row ---------------------------------------------------------


def _raw() -> dict[str, Any]:
    with PACKAGED_TABLE.open("rb") as file:
        return tomllib.load(file)


def _dump(raw: dict[str, Any]) -> str:
    """Arrays of tables; JSON literals (strings, booleans, string lists) are valid TOML values."""
    lines = []
    for key, rows in raw.items():
        if not isinstance(rows, list):
            lines.append(f"{key} = {json.dumps(rows)}")
            continue
        for row in rows:
            lines.append(f"[[{key}]]")
            lines.extend(f"{field} = {json.dumps(value)}" for field, value in row.items())
    return "\n".join(lines) + "\n"


def _row(raw: dict[str, Any], kind: str, key: str) -> dict[str, Any]:
    field = "srv" if kind == "srv" else "code"
    return next(row for row in raw[kind] if row[field] == key)


def _load(tmp_path: Path, raw: dict[str, Any]) -> None:
    path = tmp_path / "table.toml"
    path.write_text(_dump(raw), encoding="utf-8")
    load_table(path)


def test_the_test_writer_round_trips(tmp_path):
    path = tmp_path / "table.toml"
    path.write_text(_dump(_raw()), encoding="utf-8")
    table = load_table(path)
    assert table.srvs == default_table().srvs
    assert table.alerts == default_table().alerts


def test_missing_matrix_srv(tmp_path):
    raw = _raw()
    raw["srv"] = [row for row in raw["srv"] if row["srv"] != "4.8.1"]
    with pytest.raises(TableError, match=r"missing.*4\.8\.1"):
        _load(tmp_path, raw)


def test_missing_flag_request(tmp_path):
    raw = _raw()
    raw["srv"] = [row for row in raw["srv"] if row["srv"] != "8.15.2"]
    with pytest.raises(TableError, match=r"missing.*8\.15\.2"):
        _load(tmp_path, raw)


def test_duplicate_srv(tmp_path):
    raw = _raw()
    raw["srv"].append({**_row(raw, "srv", "4.8.1"), "refused_when_flagged": False})
    with pytest.raises(TableError, match=r"srv row 132 \(4\.8\.1\): duplicate SRV"):
        _load(tmp_path, raw)


def test_duplicate_alert_code_in_another_case(tmp_path):
    raw = _raw()
    raw["alert"].append({**_row(raw, "alert", "8F0A"), "code": "8f0a", "withheld_when_flagged": False})
    with pytest.raises(TableError, match=r"\(8f0a\): duplicate alert code 8F0A"):
        _load(tmp_path, raw)


def test_duplicate_key_inside_a_row_is_not_toml(tmp_path):
    path = tmp_path / "table.toml"
    text = PACKAGED_TABLE.read_text(encoding="utf-8")
    path.write_text(text.replace('srv = "4.8.1"\n', 'srv = "4.8.1"\nsrv = "4.8.2"\n'), encoding="utf-8")
    with pytest.raises(TableError, match="not valid TOML"):
        load_table(path)


def test_unreadable_file(tmp_path):
    with pytest.raises(TableError, match="cannot read"):
        load_table(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("row", "field", "value", "message"),
    [
        (("srv", "4.8.1"), "category", "consumptions", r"srv row \d+ \(4\.8\.1\): category"),
        (("alert", "8F35"), "category", "outage", r"alert row \d+ \(8F35\): category"),
        (("srv", "4.8.1"), "eligible_roles", ["IS", "XX"], r"srv row \d+ \(4\.8\.1\): eligible_roles"),
        (("srv", "4.8.1"), "critical", "no", r"\(4\.8\.1\): critical"),
        (("srv", "4.8.1"), "rationale", "", r"\(4\.8\.1\): rationale"),
        (("alert", "8F0A"), "notify_network_operator", 1, r"\(8F0A\): notify_network_operator"),
    ],
)
def test_bad_field_values(tmp_path, row, field, value, message):
    raw = _raw()
    _row(raw, *row)[field] = value
    with pytest.raises(TableError, match=message):
        _load(tmp_path, raw)


@pytest.mark.parametrize("kind", ["srv", "alert"])
def test_unknown_key_in_a_row(tmp_path, kind):
    raw = _raw()
    raw[kind][0]["refused"] = True
    with pytest.raises(TableError, match=r"row 1 \(.*\): refused: Extra inputs"):
        _load(tmp_path, raw)


def test_unknown_top_level_key(tmp_path):
    raw = _raw()
    raw["version"] = "2"
    with pytest.raises(TableError, match="version"):
        _load(tmp_path, raw)


def test_malformed_srv(tmp_path):
    raw = _raw()
    raw["srv"].append({**_row(raw, "srv", "4.8.1"), "srv": "4.8.x", "service_reference": "4.8"})
    with pytest.raises(TableError, match=r"\(4\.8\.x\): malformed SRV"):
        _load(tmp_path, raw)


def test_service_reference_not_the_srv_prefix(tmp_path):
    raw = _raw()
    _row(raw, "srv", "6.20.1")["service_reference"] = "6.2"
    with pytest.raises(TableError, match=r"\(6\.20\.1\): service_reference 6\.2"):
        _load(tmp_path, raw)


@pytest.mark.parametrize("code", ["8F0G", "8F0AA", "X1", "N", "AD"])
def test_malformed_alert_code(tmp_path, code):
    raw = _raw()
    raw["alert"].append({**_row(raw, "alert", "8F35"), "code": code})
    with pytest.raises(TableError, match="malformed alert code"):
        _load(tmp_path, raw)


@pytest.mark.parametrize("category", sorted([*ALWAYS_FLOWING, Category.CONSUMER_CHOICE_FLAG]))
def test_always_flowing_srv_cannot_be_refused(tmp_path, category):
    raw = _raw()
    row = _row(raw, "srv", "8.15.2" if category is Category.CONSUMER_CHOICE_FLAG else "11.2")
    row.update(category=category.value, refused_when_flagged=True)
    with pytest.raises(TableError, match=f"a {category} SRV cannot be refused_when_flagged"):
        _load(tmp_path, raw)


@pytest.mark.parametrize("category", sorted(ALWAYS_FLOWING))
def test_always_flowing_alert_cannot_be_withheld(tmp_path, category):
    raw = _raw()
    _row(raw, "alert", "8F35").update(category=category.value, withheld_when_flagged=True)
    with pytest.raises(TableError, match=rf"\(8F35\): a {category} alert cannot be withheld_when_flagged"):
        _load(tmp_path, raw)


def test_the_protected_categories_are_the_design_ones():
    assert {
        Category.FIRMWARE,
        Category.SECURITY,
        Category.SAFETY,
        Category.SUPPLY,
        Category.POWER_OUTAGE,
    } == ALWAYS_FLOWING


def test_flag_request_must_keep_its_category(tmp_path):
    raw = _raw()
    _row(raw, "srv", "8.15.1")["category"] = "other"
    with pytest.raises(TableError, match=r"\(8\.15\.1\): the flag request must have category"):
        _load(tmp_path, raw)


@pytest.mark.parametrize(
    ("srv", "field", "value"),
    [
        ("4.8.1", "eligible_roles", ["IS", "GS", "ED", "GT"]),
        ("4.8.1", "eligible_roles", ["IS", "GS", "ED", "GT", "OU", "RSA"]),
        ("7.1", "critical", False),
        ("8.2", "non_device", False),
        ("4.8.1", "dcc_scheduled", False),
        ("4.8.1", "name", "Read Profile Data"),
    ],
)
def test_mismatch_with_the_srv_matrix(tmp_path, srv, field, value):
    raw = _raw()
    _row(raw, "srv", srv)[field] = value
    with pytest.raises(TableError, match=rf"\({srv}\): {field} is .* but the SRV matrix says"):
        _load(tmp_path, raw)


def test_error_names_the_file(tmp_path):
    raw = _raw()
    _row(raw, "srv", "4.8.1")["category"] = "nope"
    with pytest.raises(TableError, match=str(tmp_path / "table.toml")):
        _load(tmp_path, raw)
