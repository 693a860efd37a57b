"""The MP169 invariants over hand-built event logs: each holds on a good log and fails on a bad one."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest

from gateway.config import SigningSettings
from gateway.responses import response_xml
from gateway.signing import (
    PACKAGED_PKI,
    CertificateLibrary,
    OrgCertificate,
    SigningKey,
    dsp_credentials,
    sign,
)
from rules.domain import (
    DCC_EUI,
    DeviceRecord,
    DeviceStatus,
    DeviceType,
    Eui,
    RequestId,
    Role,
    Tariff,
    UserRecord,
)
from rules.table import default_table
from simulator.devices import device_alert_xml
from simulator.estate import Estate
from simulator.invariants import (
    Event,
    EventKind,
    analyse,
    check_all,
    check_answers_signed,
    check_authorised_access,
    check_exactly_one_final,
    check_forwarded_once,
    check_malformed_handled,
    check_no_consumption_data_from_flagged,
    check_no_consumption_to_flagged,
    check_none_lost,
    check_one_final_answer,
    check_protected_traffic_delivered,
    check_spoofed_not_forwarded,
    unsigned_content,
)
from simulator.traffic import load_templates, render

AT = datetime(2025, 3, 1, 1, 0, tzinfo=UTC)
SUPPLIER = Eui("90-B3-D5-1F-30-01-00-01")
OTHER = Eui("90-B3-D5-1F-30-05-00-01")
METER = Eui("00-DB-12-00-00-00-01-A0")
NEIGHBOUR = Eui("00-DB-12-00-00-00-02-A0")
TABLE = default_table()


class Log:
    """Builds an event log the way a replay observes one; t is the position, for readable examples."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def _add(self, kind: EventKind, topic: str, payload: bytes, scenario: str = "") -> None:
        self.events.append(Event(float(len(self.events)), kind, topic, payload, scenario))

    def request(
        self, srv, counter, device=METER, *, user=SUPPLIER, topic_user=None, fields=None, scenario=""
    ):
        template = load_templates()[srv]
        target = DCC_EUI if template.command_variant == 8 else device
        if template.command_variant == 8 and template.device_tag:
            fields = {template.device_tag: device, **(fields or {})}
        request_id = RequestId(user, target, counter)
        payload = render(template, request_id, fields)
        self._add(EventKind.REQUEST, f"dsp/in/{topic_user or user}", payload, scenario)
        return request_id, payload

    def raw_request(self, payload: bytes, user=SUPPLIER, scenario="malformed/random-bytes"):
        self._add(EventKind.REQUEST, f"dsp/in/{user}", payload, scenario)

    def answer(self, request_id, code, srv, user=None, at=AT):
        payload = response_xml(request_id=request_id, code=code, service_reference=None, srv=srv, at=at)
        self._add(EventKind.ANSWER, f"dsp/out/{user or (request_id and request_id.originator)}", payload)
        return payload

    def command(self, payload, device=METER):
        self._add(EventKind.COMMAND, f"dsp/device/{device}/cmd", payload)

    def up(self, payload, device=METER):
        self._add(EventKind.UP, f"dsp/device/{device}/up", payload)

    def out(self, payload, user=SUPPLIER):
        self._add(EventKind.ANSWER, f"dsp/out/{user}", payload)

    def deadletter(self, original: bytes):
        envelope = {"reason": "not-well-formed", "detail": "", "topic": "dsp/in/x"}
        envelope["payload_base64"] = base64.b64encode(original).decode()
        self._add(EventKind.DEADLETTER, "dsp/deadletter", json.dumps(envelope).encode())

    def flag(self, counter, device=METER, *, set_flag=True, code="I0"):
        srv = "8.15.1" if set_flag else "8.15.2"
        request_id, _ = self.request(srv, counter, device)
        self.answer(request_id, code, srv)

    def forwarded(self, srv, counter, device=METER, final="I0"):
        """A request the gateway forwards: I99, the command, the device's response, relayed."""
        request_id, payload = self.request(srv, counter, device)
        self.command(payload, DCC_EUI if load_templates()[srv].command_variant == 8 else device)
        self.answer(request_id, "I99", srv)
        self.answer(request_id, final, srv)
        return request_id

    def analysis(self, estate=None):
        return analyse(self.events, estate=estate)


def alert(code: str, counter: int, device=METER) -> bytes:
    return device_alert_xml(
        response_id=f"{device}:{DCC_EUI}:{counter}", code=code, at=AT, gbcs_payload=b"\x0f"
    )


# -- (a) no consumption-related command reaches a flagged device ------------------------------------


def test_a_holds_when_consumption_requests_are_refused_after_the_flag_ack():
    log = Log()
    _, before = log.request("4.8.1", 1)
    flag_id, _ = log.request("8.15.1", 2)
    log.command(before)  # between the flag-set and its acknowledgement: allowed
    log.answer(flag_id, "I0", "8.15.1")
    refused, _ = log.request("4.8.1", 3)
    log.answer(refused, "E169", "4.8.1")
    log.forwarded("4.8.1", 4, NEIGHBOUR)  # another device, not flagged
    result = check_no_consumption_to_flagged(log.analysis(), TABLE)
    assert result.passed
    assert result.checked == 2


def test_a_fails_on_a_consumption_command_after_the_flag_ack():
    log = Log()
    log.flag(1)
    leaked = log.forwarded("4.8.1", 2)
    result = check_no_consumption_to_flagged(log.analysis(), TABLE)
    assert not result.passed
    assert result.violations == 1
    assert str(leaked) in result.counterexamples[0]
    assert f"{SUPPLIER}:{DCC_EUI}:1" in result.counterexamples[0]


def test_a_ends_with_the_clear_ack_and_ignores_refused_flag_requests():
    log = Log()
    log.flag(1)
    log.flag(2, set_flag=False)
    log.forwarded("4.6.1", 3)
    log.flag(4, NEIGHBOUR, code="E081505")  # refused: never flagged
    log.forwarded("4.17", 5, NEIGHBOUR)
    assert check_no_consumption_to_flagged(log.analysis(), TABLE).passed


def test_a_covers_a_schedule_of_a_consumption_srv_for_a_flagged_device():
    log = Log()
    log.flag(1)
    log.forwarded("5.1", 2)  # 5.1 goes to the DCC; its body names the flagged meter
    result = check_no_consumption_to_flagged(log.analysis(), TABLE)
    assert not result.passed
    assert "5.1" in result.counterexamples[0]


def test_a_allows_a_command_sent_while_a_successful_clear_was_in_flight_and_counts_it():
    log = Log()
    log.flag(1)
    clear_id, _ = log.request("8.15.2", 2)
    log.forwarded("4.8.1", 3)  # decided once the clear was in the store, before its I0
    log.answer(clear_id, "I0", "8.15.2")
    log.forwarded("4.8.1", 4)  # after the clear's I0
    result = check_no_consumption_to_flagged(log.analysis(), TABLE)
    assert result.passed
    assert result.counts["while-clear-in-flight"] == 1
    # A clear that is refused ends nothing: the command sent meanwhile is a violation.
    log = Log()
    log.flag(1)
    refused_id, _ = log.request("8.15.2", 2)
    early = log.forwarded("4.8.1", 3)
    log.answer(refused_id, "E081509", "8.15.2")
    result = check_no_consumption_to_flagged(log.analysis(), TABLE)
    assert result.violations == 1
    assert str(early) in result.counterexamples[0]
    log = Log()
    log.flag(1)
    log.forwarded("4.8.1", 2)
    result = check_no_consumption_to_flagged(log.analysis(), TABLE)
    assert result.violations == 1
    assert "while-clear-in-flight" not in result.counts


# -- (b) firmware, security, safety traffic gets through ------------------------------------------------


def test_b_holds_when_firmware_and_security_alerts_reach_their_destinations():
    log = Log()
    log.flag(1)
    log.forwarded("11.3", 2)
    log.forwarded("11.1", 3)  # CommandVariant 8: reaches the DCC, which updates the flagged meter
    security = alert("8F1E", 1)
    log.up(security)
    log.out(security)
    result = check_protected_traffic_delivered(log.analysis(), TABLE)
    assert result.passed
    assert result.checked == 3
    assert result.counts["requests-delivered"] == 2
    assert result.counts["messages-delivered"] == 1


@pytest.mark.parametrize("answer", ["E169", None])
def test_b_fails_when_firmware_for_a_flagged_device_is_refused_or_dropped(answer):
    log = Log()
    log.flag(1)
    request_id, _ = log.request("11.3", 2)
    if answer:
        log.answer(request_id, answer, "11.3")
    result = check_protected_traffic_delivered(log.analysis(), TABLE)
    assert not result.passed
    assert str(request_id) in result.counterexamples[0]


def test_b_counts_a_rejection_for_another_reason_without_failing():
    log = Log()
    log.flag(1)
    request_id, _ = log.request("11.3", 2)
    log.answer(request_id, "E2", "11.3")
    result = check_protected_traffic_delivered(log.analysis(), TABLE)
    assert result.passed
    assert result.counts["requests-rejected-otherwise"] == 1


def test_b_fails_when_a_security_alert_from_a_flagged_device_is_held_back():
    log = Log()
    log.flag(1)
    log.up(alert("8F1E", 1))
    log.up(alert("8F1E", 2, NEIGHBOUR), NEIGHBOUR)  # not flagged: not this invariant's business
    result = check_protected_traffic_delivered(log.analysis(), TABLE)
    assert not result.passed
    assert result.checked == 1
    assert "8F1E" in result.counterexamples[0]


# -- (c) exactly one final answer -----------------------------------------------------------------------


def test_c_accepts_a_single_answer_or_an_acknowledgement_and_one_final():
    log = Log()
    log.forwarded("4.6.1", 1)
    refused, _ = log.request("4.6.1", 2)
    log.answer(refused, "E169", "4.6.1")
    timed_out, _ = log.request("4.17", 3)
    log.answer(timed_out, "I99", "4.17")
    log.answer(timed_out, "E21", "4.17")
    result = check_one_final_answer(log.analysis())
    assert result.passed
    assert result.checked == 3


@pytest.mark.parametrize("codes", [[], ["I99"], ["I99", "I0", "I0"], ["E4", "E4"], ["I99", "I99", "I0"]])
def test_c_fails_on_missing_or_repeated_answers(codes):
    log = Log()
    request_id, _ = log.request("4.6.1", 1)
    for code in codes:
        log.answer(request_id, code, "4.6.1")
    result = check_one_final_answer(log.analysis())
    assert not result.passed
    assert str(request_id) in result.counterexamples[0]


def test_c_reads_answers_on_the_topic_of_the_publisher_for_spoofed_requests():
    log = Log()
    spoofed, _ = log.request("4.6.1", 1, user=SUPPLIER, topic_user=OTHER, scenario="spoofed")
    log.answer(spoofed, "E1", "4.6.1", user=OTHER)
    assert check_one_final_answer(log.analysis()).passed
    log = Log()
    spoofed, _ = log.request("4.6.1", 1, user=SUPPLIER, topic_user=OTHER, scenario="spoofed")
    log.answer(spoofed, "E1", "4.6.1", user=SUPPLIER)  # told the victim, not the sender
    assert not check_one_final_answer(log.analysis()).passed


# -- across instances (tests/gateway/test_failover.py): one final, none lost, forwarded once -------------


def test_exactly_one_final_counts_the_same_answer_again_apart_and_fails_on_a_different_final():
    log = Log()
    relayed = log.forwarded("4.6.1", 1)
    repeated, _ = log.request("4.6.1", 2)
    log.answer(repeated, "I99", "4.6.1")
    final = log.answer(repeated, "I0", "4.6.1")
    log.out(final)  # the same document again: a QoS 1 redelivery
    result = check_exactly_one_final(log.analysis())
    assert result.passed
    assert result.checked == 2
    assert result.counts["repeated-finals"] == 1
    log.answer(repeated, "I0", "4.6.1", at=AT + timedelta(seconds=1))  # given again after a crash
    result = check_exactly_one_final(log.analysis())
    assert result.passed
    assert result.counts["repeated-finals"] == 2
    log.answer(relayed, "E21", "4.6.1")  # the device's answer relayed, then a timeout: two answers
    result = check_exactly_one_final(log.analysis())
    assert not result.passed
    assert result.violations == 1
    assert result.counts["different-finals"] == 1
    assert result.counts["repeated-finals"] == 2
    assert str(relayed) in result.counterexamples[0]


def test_exactly_one_final_allows_one_final_per_request_sharing_a_request_id():
    log = Log()
    request_id, _ = log.request("4.6.1", 1)
    log.request("4.6.1", 1)
    log.answer(request_id, "I99", "4.6.1")
    log.answer(request_id, "E16901", "4.6.1")
    log.answer(request_id, "I0", "4.6.1")
    assert check_exactly_one_final(log.analysis()).passed
    assert check_none_lost(log.analysis()).passed


@pytest.mark.parametrize("codes", [[], ["I99"], ["I99", "I99"]])
def test_none_lost_fails_on_a_request_without_a_final_answer(codes):
    log = Log()
    log.forwarded("4.6.1", 1)
    request_id, _ = log.request("4.6.1", 2)
    for code in codes:
        log.answer(request_id, code, "4.6.1")
    result = check_none_lost(log.analysis())
    assert not result.passed
    assert result.checked == 2
    assert result.counts["missing"] == 1
    assert str(request_id) in result.counterexamples[0]


def test_forwarded_once_fails_on_a_request_id_reaching_a_device_twice():
    log = Log()
    once = log.forwarded("4.6.1", 1)
    twice = log.forwarded("4.6.1", 2)
    result = check_forwarded_once(log.analysis())
    assert result.passed
    assert result.checked == 2
    _, payload = log.request("4.6.1", 2)
    log.command(payload)  # the same command again (a redelivery forwarded again)
    log.command(payload + b"\n")  # and a different document with that RequestID
    result = check_forwarded_once(log.analysis())
    assert not result.passed
    assert result.violations == 1
    assert result.counts == {"identical-copies": 1, "different-copies": 1}
    assert str(twice) in result.counterexamples[0]
    assert str(once) not in result.counterexamples[0]


# -- (d) malformed input --------------------------------------------------------------------------------


def test_d_accepts_a_dead_letter_or_an_error_answer():
    log = Log()
    log.raw_request(b"\x00garbage")
    log.deadletter(b"\x00garbage")
    log.raw_request(b"<not-closed", scenario="malformed/truncated")
    log.answer(None, "E4", "4.8.1", user=SUPPLIER)
    unknown, _ = log.request("4.6.1", 1, scenario="malformed/unknown-srv")
    log.answer(unknown, "E4", "4.6.1")
    result = check_malformed_handled(log.analysis())
    assert result.passed
    assert result.checked == 3
    assert result.counts == {"deadlettered": 1, "error-answered": 2}


def test_d_fails_when_malformed_input_is_ignored_or_reaches_a_device():
    log = Log()
    log.raw_request(b"\x00garbage")
    log.deadletter(b"something else")
    log.answer(None, "E4", "4.8.1", user=OTHER)  # another user's answer does not count
    result = check_malformed_handled(log.analysis())
    assert not result.passed
    assert "no dead letter" in result.counterexamples[0]
    log = Log()
    log.raw_request(b"<broken", scenario="malformed/truncated")
    log.command(b"<broken")
    log.deadletter(b"<broken")
    assert "reached a device" in check_malformed_handled(log.analysis()).counterexamples[0]


# -- (e) no consumption data from flagged devices, (f) spoofing --------------------------------------


def test_e_fails_when_a_billing_alert_from_a_flagged_device_is_delivered():
    log = Log()
    log.up(alert("8F0A", 1))
    log.out(alert("8F0A", 1))  # before the flag: fine
    log.flag(1)
    withheld = alert("8F0A", 2)
    log.up(withheld)
    assert check_no_consumption_data_from_flagged(log.analysis(), TABLE).passed
    log.out(withheld)
    result = check_no_consumption_data_from_flagged(log.analysis(), TABLE)
    assert not result.passed
    assert "8F0A" in result.counterexamples[0]


def test_f_fails_when_a_spoofed_request_is_forwarded():
    log = Log()
    _, payload = log.request("4.6.1", 1, topic_user=OTHER, scenario="spoofed")
    assert check_spoofed_not_forwarded(log.analysis()).passed
    log.command(payload)
    assert not check_spoofed_not_forwarded(log.analysis()).passed


def test_check_all_names_every_invariant():
    log = Log()
    log.flag(1)
    log.forwarded("11.3", 2)
    assert "authorised-access" not in [r.name for r in check_all(log.events, TABLE)]  # nothing to judge by
    results = check_all(log.events, TABLE, estate=ESTATE)
    assert [r.name for r in results] == [
        "no-consumption-to-flagged",
        "protected-traffic-delivered",
        "one-final-answer",
        "malformed-input-handled",
        "no-consumption-data-from-flagged",
        "spoofed-not-forwarded",
        "authorised-access",
    ]
    assert all(r.passed for r in results)


# -- answers signed by the DSP ----------------------------------------------------------------------

DSP_KEY, DSP_CERTIFICATE = dsp_credentials(SigningSettings())
DSP_LIBRARY = CertificateLibrary([DSP_CERTIFICATE])


def test_answers_signed_holds_when_each_answer_verifies_against_the_dsp() -> None:
    log = Log()
    request_id, _ = log.request("4.8.1", 1)
    log.out(sign(log.answer(request_id, "I99", "4.8.1"), DSP_KEY, DSP_CERTIFICATE))
    log.events.pop(-2)  # keep only the signed copy of the answer
    result = check_answers_signed(log.analysis(), DSP_LIBRARY)
    assert (result.passed, result.checked, result.counts) == (True, 1, {"verified": 1})


def test_answers_signed_fails_on_unsigned_and_foreign_answers() -> None:
    log = Log()
    request_id, _ = log.request("4.8.1", 1)
    log.answer(request_id, "I99", "4.8.1")  # unsigned
    other_key = SigningKey.from_file(PACKAGED_PKI / "xml-sign-90B3D51F30010000-ds.key")
    other = OrgCertificate.from_pem((PACKAGED_PKI / "xml-sign-90B3D51F30010000-ds.pem").read_bytes())
    log.out(
        sign(
            response_xml(request_id=request_id, code="I0", service_reference=None, srv="4.8.1", at=AT),
            other_key,
            other,
        )
    )
    result = check_answers_signed(log.analysis(), DSP_LIBRARY)
    assert not result.passed
    assert result.counts == {"signature-missing": 1, "certificate-unknown": 1}


def test_a_relayed_message_counts_as_delivered_once_the_dsp_signed_it() -> None:
    log = Log()
    payload = alert("8F35", 1)  # a security alert, from a flagged meter
    log.flag(1)
    log.up(payload)
    log.out(sign(payload, DSP_KEY, DSP_CERTIFICATE))
    result = check_protected_traffic_delivered(log.analysis(), TABLE)
    assert (result.passed, result.checked) == (True, 1)
    assert unsigned_content(sign(payload, DSP_KEY, DSP_CERTIFICATE)) == unsigned_content(payload)
    assert unsigned_content(b"\x00 not xml") == b"\x00 not xml"


# -- by whose data it is, and (g) authorised access ---------------------------------------------------

GAS_METER = Eui("00-DB-12-00-00-00-01-A1")
HUB = Eui("00-DB-12-00-00-00-01-A2")
GAS_PROXY = Eui("00-DB-12-00-00-00-01-A3")
STRANGER = Eui("90-B3-D5-1F-30-01-00-09")


def _row(device: Eui, device_type: DeviceType, **suppliers: Eui | None) -> DeviceRecord:
    return DeviceRecord(
        device_id=device,
        device_type=device_type,
        smets=2,
        status=DeviceStatus.COMMISSIONED,
        comms_hub_id=None if device_type is DeviceType.CHF else HUB,
        mpxn=None,
        import_supplier=suppliers.get("importer"),
        export_supplier=None,
        gas_supplier=suppliers.get("gas"),
        tariff=Tariff.SINGLE,
        wan=True,
    )


ESTATE = Estate(
    devices=(
        _row(HUB, DeviceType.CHF, importer=SUPPLIER, gas=SUPPLIER),
        _row(METER, DeviceType.ESME, importer=SUPPLIER),
        _row(GAS_METER, DeviceType.GSME, gas=SUPPLIER),
        _row(GAS_PROXY, DeviceType.GPF, gas=SUPPLIER),
    ),
    users=(
        UserRecord(SUPPLIER, frozenset({Role.IMPORT_SUPPLIER, Role.GAS_SUPPLIER})),
        UserRecord(STRANGER, frozenset({Role.IMPORT_SUPPLIER, Role.GAS_SUPPLIER})),
    ),
)


def test_a_gas_read_through_the_gpf_of_a_flagged_gsme_is_caught_given_the_estate():
    log = Log()
    log.flag(1, GAS_METER)
    log.forwarded("4.1.1", 2, GAS_PROXY)
    assert check_no_consumption_to_flagged(log.analysis(), TABLE).passed  # the addressed device only
    result = check_no_consumption_to_flagged(log.analysis(ESTATE), TABLE)
    assert not result.passed
    assert GAS_METER in result.counterexamples[0]


def test_e_judges_an_alert_from_the_gpf_by_the_gsmes_flag():
    log = Log()
    log.flag(1, GAS_METER)
    billing = alert("8F0A", 2, GAS_PROXY)
    log.up(billing, GAS_PROXY)
    log.out(billing)
    assert check_no_consumption_data_from_flagged(log.analysis(), TABLE).passed
    assert not check_no_consumption_data_from_flagged(log.analysis(ESTATE), TABLE).passed


def test_g_fails_when_a_request_reaches_a_device_its_originator_is_not_registered_for():
    log = Log()
    log.forwarded("7.2", 1, METER)  # the registered import supplier: fine
    assert check_authorised_access(log.analysis(ESTATE), TABLE).passed
    request_id, payload = log.request("7.2", 2, METER, user=STRANGER)
    log.command(payload)
    result = check_authorised_access(log.analysis(ESTATE), TABLE)
    assert not result.passed
    assert str(request_id) in result.counterexamples[0]
    # Without the estate there is nothing to judge by.
    assert check_authorised_access(log.analysis(), TABLE).checked == 0


def test_g_fails_when_an_unsolicited_alert_reaches_a_user_not_registered_for_the_device():
    log = Log()
    tamper = alert("81BC", 1, GAS_METER)
    log.up(tamper, GAS_METER)
    log.out(tamper, SUPPLIER)
    assert check_authorised_access(log.analysis(ESTATE), TABLE).passed
    log.out(tamper, STRANGER)
    result = check_authorised_access(log.analysis(ESTATE), TABLE)
    assert not result.passed
    assert STRANGER in result.counterexamples[0]
