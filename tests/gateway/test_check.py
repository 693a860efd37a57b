"""`mp169 check`: through the console script's main(), on real samples, flagged and not, and on bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gateway import cli
from gateway.check import EXIT_REJECTED
from gateway.signing import PACKAGED_PKI, OrgCertificate, SigningKey, sign

RULES = Path(__file__).resolve().parents[2] / "rules"
REQUESTS = RULES / "duis" / "requests"
PROFILE = REQUESTS / "ECS22b_4.8.1_SINGLE_SUCCESS_REQUEST_DUIS.XML"
CREDENTIALS = REQUESTS / "CS02bNOByNO_6.15.1_SUCCESS_REQUEST_DUIS.XML"
INVENTORY = REQUESTS / "8.2_READ_INVENTORY_REQUEST_DUIS.XML"
SCHEDULE = REQUESTS / "ECS21a_5.1._DCC_SCHEDULED_REQUEST_DUIS.XML"
FLAG_SET = RULES / "mp169-requests" / "8.15.1_SET_REDUCED_COMMUNICATIONS_REQUEST_DUIS.XML"
FIELDS = {
    "file",
    "request_id",
    "srv",
    "command_variant",
    "originator",
    "target",
    "concerned_devices",
    "scheduled_srv",
    "decision",
    "response_code",
    "reason",
    "detail",
    "signature",
    "signature_code",
}


@pytest.fixture(autouse=True)
def only_check_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # The other subcommands' modules are other parts of the project; this tests `check` alone.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("gateway.check",))


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, list[dict[str, object]]]:
    status = cli.main(["check", *map(str, argv)])
    lines = capsys.readouterr().out.splitlines()
    return status, [json.loads(line) for line in lines]


def test_unflagged_samples_are_forwarded(capsys: pytest.CaptureFixture[str]) -> None:
    status, rows = run(capsys, PROFILE, CREDENTIALS, SCHEDULE, INVENTORY)
    assert status == 0
    assert all(set(row) == FIELDS for row in rows)
    assert [(row["srv"], row["decision"]) for row in rows] == [
        ("4.8.1", "forward"),
        ("6.15.1", "forward"),
        ("5.1", "forward"),
        ("8.2", "handle-locally"),
    ]
    assert rows[0] | {"detail": ""} == {
        "file": str(PROFILE),
        "request_id": "90-B3-D5-1F-30-01-00-00:00-DB-12-34-56-78-90-A0:1002",
        "srv": "4.8.1",
        "command_variant": 1,
        "originator": "90-B3-D5-1F-30-01-00-00",
        "target": "00-DB-12-34-56-78-90-A0",
        "concerned_devices": ["00-DB-12-34-56-78-90-A0"],
        "scheduled_srv": None,
        "decision": "forward",
        "response_code": "I99",
        "reason": "forwarded",
        "detail": "",
        # DCC's templates carry placeholder signatures: the gateway would answer E16912.
        "signature": {
            "valid": False,
            "signer": None,
            "serial": "1234567890",
            "reason": "certificate-unknown",
            "detail": "no certificate CN=U1, OU=07 / 1234567890 in the library",
        },
        "signature_code": "E16912",
    }


def test_a_signed_request_is_reported_verified(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    signed = tmp_path / "signed.xml"
    signed.write_bytes(sign(PROFILE.read_bytes(), *supplier_credentials()))
    status, [row] = run(capsys, signed)
    assert status == 0
    assert row["signature"] == {
        "valid": True,
        "signer": "90-B3-D5-1F-30-01-00-00",
        "serial": str(supplier_credentials()[1].serial),
        "reason": "verified",
        "detail": "signed by 90-B3-D5-1F-30-01-00-00",
    }
    assert row["signature_code"] is None
    # Against a library without the signer's certificate.
    (tmp_path / "empty").mkdir()
    _, [row] = run(capsys, "--certs", tmp_path / "empty", signed)
    assert row["signature_code"] == "E16912"


def supplier_credentials() -> tuple[SigningKey, OrgCertificate]:
    name = PACKAGED_PKI / "xml-sign-90B3D51F30010000-ds"
    return SigningKey.from_file(name.with_suffix(".key")), OrgCertificate.from_pem(
        name.with_suffix(".pem").read_bytes()
    )


def test_flagged_consumption_requests_are_refused_and_the_rest_forwarded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, rows = run(capsys, "--flagged", PROFILE, CREDENTIALS, SCHEDULE, INVENTORY)
    assert status == 0  # a refusal is a decision, not bad input
    assert [(row["srv"], row["decision"], row["response_code"]) for row in rows] == [
        ("4.8.1", "refuse", "E169"),
        ("6.15.1", "forward", "I99"),
        ("5.1", "refuse", "E169"),
        ("8.2", "handle-locally", rows[3]["response_code"]),
    ]
    assert rows[0]["reason"] == "consumer-choice"
    assert rows[2]["scheduled_srv"] == "4.6.1"


def test_malformed_file_is_rejected_with_its_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.xml"
    truncated.write_bytes(PROFILE.read_bytes()[:300])
    status, rows = run(capsys, PROFILE, truncated)
    assert status == EXIT_REJECTED
    assert rows[0]["decision"] == "forward"
    assert set(rows[1]) == FIELDS
    assert (rows[1]["file"], rows[1]["decision"], rows[1]["response_code"], rows[1]["reason"]) == (
        str(truncated),
        "reject",
        "E16902",
        "not-well-formed",
    )
    assert rows[1]["detail"]


def test_readable_request_id_is_reported_with_the_rejection(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad_variant = tmp_path / "cv9.xml"
    bad_variant.write_bytes(
        PROFILE.read_bytes().replace(b">1</sr:CommandVariant>", b">9</sr:CommandVariant>")
    )
    status, (row,) = run(capsys, bad_variant)
    assert status == EXIT_REJECTED
    assert (row["reason"], row["originator"], row["target"]) == (
        "bad-command-variant",
        "90-B3-D5-1F-30-01-00-00",
        "00-DB-12-34-56-78-90-A0",
    )


def test_missing_file_and_entity_attack_are_rejected(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    attack = tmp_path / "xxe.xml"
    attack.write_bytes(b'<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>')
    status, rows = run(capsys, tmp_path / "absent.xml", attack)
    assert status == EXIT_REJECTED
    assert [(row["decision"], row["reason"]) for row in rows] == [
        ("reject", "unreadable"),
        ("reject", "doctype-forbidden"),
    ]


def test_roles_are_checked_only_when_given(capsys: pytest.CaptureFixture[str]) -> None:
    # 11.1 Update Firmware is eligible for IS and GS only (SRV matrix).
    firmware = REQUESTS / "11.1_UPDATE_FIRMWARE_REQUEST_DUIS.XML"
    status, rows = run(capsys, firmware, "--roles", "OU ED")
    assert status == EXIT_REJECTED
    assert (rows[0]["decision"], rows[0]["reason"]) == ("reject", "role-not-eligible")
    status, rows = run(capsys, "--roles", "GS,IS", firmware)
    assert (status, rows[0]["decision"]) == (0, "forward")
    status, rows = run(capsys, firmware)
    assert (status, rows[0]["decision"]) == (0, "forward")


def test_flag_request_example_is_handled_locally(capsys: pytest.CaptureFixture[str]) -> None:
    status, (row,) = run(capsys, FLAG_SET)
    assert status == 0
    assert (row["srv"], row["decision"], row["concerned_devices"]) == (
        "8.15.1",
        "handle-locally",
        ["00-DB-12-34-56-78-90-A0"],
    )


@pytest.mark.parametrize("argv", [["--roles", "XX"], ["--dcc-eui", "not-an-eui"], []])
def test_bad_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check", *argv, *([str(PROFILE)] if argv else [])])
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_a_dash_reads_the_request_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(PROFILE.read_bytes())))
    status, rows = run(capsys, "--flagged", "-", PROFILE)
    assert status == 0
    assert [(row["file"], row["srv"], row["response_code"]) for row in rows] == [
        ("-", "4.8.1", "E169"),
        (str(PROFILE), "4.8.1", "E169"),
    ]


def test_device_type_and_registration_show_e11_and_e4(capsys: pytest.CaptureFixture[str]) -> None:
    read = REQUESTS / "ECS17b_4.1.1_DSP_FUTURE_DATED_REQUEST_DUIS.XML"
    disable = REQUESTS / "ECS43_7.2_SUCCESS_REQUEST_DUIS.XML"
    status, rows = run(capsys, "--device-type", "GSME", read)
    assert (status, rows[0]["response_code"], rows[0]["reason"]) == (EXIT_REJECTED, "E11", "device-type")
    status, rows = run(capsys, "--device-type", "GPF", read)
    assert (status, rows[0]["decision"]) == (0, "forward")
    status, rows = run(capsys, "--roles", "IS", "--unregistered", disable)
    assert (status, rows[0]["response_code"], rows[0]["reason"]) == (
        EXIT_REJECTED,
        "E4",
        "device-not-authorised",
    )
    status, rows = run(capsys, "--roles", "IS", disable)
    assert (status, rows[0]["decision"]) == (0, "forward")
