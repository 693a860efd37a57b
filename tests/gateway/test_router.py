"""The router with no event loop: every routing path, driven as the shell would (tests/gateway/desk.py)."""

from __future__ import annotations

import ast
import base64
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

import gateway.router
from gateway.router import (
    DEADLETTER_PAYLOAD_BYTES,
    Admission,
    CommitRolledBack,
    DeviceMessageRouted,
    DuplicateDelivery,
    Publish,
    Received,
    RequestDecided,
    RequestTimedOut,
)
from gateway.signing import Verification, document_parser
from rules.codes import ResponseCode
from rules.domain import ANSWER_RESPONSE, ANSWER_TIMEOUT, Eui, RequestId
from rules.table import default_table
from tests.gateway.desk import TOPICS, Desk, Durable
from tests.gateway.messages import (
    CONSUMPTION_SRV,
    DCC,
    FIRMWARE_SRV,
    SECURITY_SRV,
    UNKNOWN_METER,
    alert,
    flag_request,
    meter_reading_answer,
    request,
)
from tests.gateway.test_inventory import (
    GAS_METER,
    GAS_SUPPLIER,
    HUB,
    IMPORT_SUPPLIER,
    METER,
    NEW_SUPPLIER,
    USERS,
)


@pytest.fixture
def desk() -> Desk:
    return Desk()


def read(counter: int) -> bytes:
    return request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, counter)


def set_flag(counter: int, *, declared: bool = True) -> bytes:
    return flag_request(IMPORT_SUPPLIER, counter, METER, set_flag=True, declared=declared)


def clear_flag(counter: int) -> bytes:
    return flag_request(IMPORT_SUPPLIER, counter, METER, set_flag=False)


# -- the router does no I/O -----------------------------------------------------------------------

IO_MODULES = {"asyncio", "aiosqlite", "sqlite3", "socket", "gmqtt", "time", "logging", "structlog", "os"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
    return names


def test_the_router_and_what_it_imports_from_the_project_do_no_io() -> None:
    # The router and every project module it imports at run time (not only for type checking).
    seen: set[str] = set()
    todo = ["gateway.router"]
    root = Path(gateway.router.__file__).resolve().parent.parent
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = root.joinpath(*module.split(".")).with_suffix(".py")
        tree = ast.parse(path.read_text())
        runtime = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        for node in runtime:
            names = (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            )
            for name in names:
                top = name.split(".")[0]
                assert top not in IO_MODULES, f"{module} imports {name}"
                if top in {"gateway", "rules"}:
                    todo.append(name)
    assert "rules.domain" in seen
    assert not {
        module
        for module in seen
        if module.startswith(("gateway.shell", "gateway.store", "gateway.mqtt", "gateway.outcomes"))
    }


# -- Service Requests -----------------------------------------------------------------------------


def test_a_consumption_read_is_forwarded_then_acknowledged_once_durable() -> None:
    desk = Desk(hold=True)
    payload = read(1)
    assert desk.send(IMPORT_SUPPLIER, payload) == []  # nothing leaves before the counter is durable
    assert desk.acknowledged == []
    out = desk.commit()
    assert out == [
        Publish(TOPICS.command(METER), payload),
        out[1],
    ]
    assert desk.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.ACKNOWLEDGED]
    assert desk.acknowledged == [0]
    assert desk.durable.counters == {IMPORT_SUPPLIER: 1}
    assert METER in {request_id.target for request_id in desk.router.pending}


def test_a_flagged_device_refuses_consumption_but_not_security_or_firmware(desk: Desk) -> None:
    assert desk.answers_to(IMPORT_SUPPLIER, desk.send(IMPORT_SUPPLIER, set_flag(1))) == [ResponseCode.SUCCESS]
    refused = desk.send(IMPORT_SUPPLIER, read(2))
    assert desk.commands(refused) == []
    assert desk.answers_to(IMPORT_SUPPLIER, refused) == [ResponseCode.CONSUMER_CHOICE]
    assert b"consumer" in refused[0].payload
    security = desk.send(IMPORT_SUPPLIER, request(SECURITY_SRV, IMPORT_SUPPLIER, METER, 3))
    assert desk.commands(security) == [TOPICS.command(METER)]
    firmware = desk.send(IMPORT_SUPPLIER, request(FIRMWARE_SRV, IMPORT_SUPPLIER, DCC, 4, DeviceIDList=METER))
    assert desk.commands(firmware) == [TOPICS.command(DCC)]


def test_the_flag_is_refused_to_a_supplier_that_is_not_responsible(desk: Desk) -> None:
    out = desk.send(NEW_SUPPLIER, flag_request(NEW_SUPPLIER, 1, METER, set_flag=True))
    assert desk.answers_to(NEW_SUPPLIER, out) == [ResponseCode.NOT_RESPONSIBLE_SUPPLIER]
    assert desk.commands(desk.send(IMPORT_SUPPLIER, read(1))) == [TOPICS.command(METER)]


def test_a_flag_without_the_declaration_is_refused(desk: Desk) -> None:
    out = desk.send(IMPORT_SUPPLIER, set_flag(1, declared=False))
    assert desk.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.FLAG_DECLARATION_MISSING]
    assert desk.agree() == frozenset()


def test_clearing_the_flag_restores_forwarding_and_both_are_in_the_history(desk: Desk) -> None:
    desk.send(IMPORT_SUPPLIER, set_flag(1))
    assert desk.answers_to(IMPORT_SUPPLIER, desk.send(IMPORT_SUPPLIER, clear_flag(2))) == [
        ResponseCode.SUCCESS
    ]
    assert desk.commands(desk.send(IMPORT_SUPPLIER, read(3))) == [TOPICS.command(METER)]
    assert [(event.set, event.outcome) for event in desk.durable.history] == [
        (True, "accepted"),
        (False, "accepted"),
    ]


def test_messages_after_a_flag_request_wait_undecided_until_it_is_durable() -> None:
    desk = Desk(hold=True)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.send(IMPORT_SUPPLIER, set_flag(2))
    desk.send(IMPORT_SUPPLIER, read(3))
    assert len(desk.waiting_reads) == 1
    assert len(desk.waiting_commits) == 1  # read 1's counter; read 3 is not even decided yet
    desk.read()
    assert len(desk.waiting_commits) == 2  # the flag event joins; read 3 still waits
    out = desk.commit()
    assert desk.commands(out) == [TOPICS.command(METER)]
    assert desk.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.ACKNOWLEDGED, ResponseCode.SUCCESS]
    out += desk.commit()  # read 3, decided against the durable flag
    assert desk.answers_to(IMPORT_SUPPLIER, out)[-1] == ResponseCode.CONSUMER_CHOICE
    # The earlier command left before the supplier held the flag's acknowledgement.
    topics = [publish.topic for publish in out]
    assert topics.index(TOPICS.command(METER)) < topics.index(TOPICS.out(IMPORT_SUPPLIER), 1)
    assert desk.acknowledged == [0, 1, 2]


def test_a_stream_with_flag_requests_is_decided_in_arrival_order(desk: Desk) -> None:
    out = []
    for counter in range(1, 121):
        if counter % 20 == 0:
            out += desk.send(
                IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, counter, METER, set_flag=counter % 40 == 0)
            )
        else:
            out += desk.send(IMPORT_SUPPLIER, read(counter))
    codes = desk.answers_to(IMPORT_SUPPLIER, out)
    assert ResponseCode.DUPLICATE_REQUEST_ID not in codes
    assert len(codes) == 120
    refused = set(range(41, 60)) | set(range(81, 100))
    assert codes.count(ResponseCode.CONSUMER_CHOICE) == len(refused)


def test_a_spoofed_originator_is_answered_on_the_senders_topic_only(desk: Desk) -> None:
    out = desk.send(GAS_SUPPLIER, read(1))
    assert [publish.topic for publish in out] == [TOPICS.out(GAS_SUPPLIER)]
    assert desk.answers_to(GAS_SUPPLIER, out) == [ResponseCode.ORIGINATOR_MISMATCH]
    decided = [o for o in desk.observed if isinstance(o, RequestDecided)]
    assert [(o.user, o.admission) for o in decided] == [(GAS_SUPPLIER, Admission.SPOOFED)]
    # The victim's counter is untouched: its own request 1 still goes through.
    assert desk.commands(desk.send(IMPORT_SUPPLIER, read(1))) == [TOPICS.command(METER)]


def test_a_repeated_request_id_is_refused_and_never_forwarded_twice(desk: Desk) -> None:
    desk.send(IMPORT_SUPPLIER, read(7))
    again = desk.send(IMPORT_SUPPLIER, read(7)) + desk.send(IMPORT_SUPPLIER, read(6))
    assert desk.commands(again) == []
    assert desk.answers_to(IMPORT_SUPPLIER, again) == [ResponseCode.DUPLICATE_REQUEST_ID] * 2
    # The refusal names the counter it was held against: the user can tell a repeat from a reordering.
    refusals = [
        o.detail
        for o in desk.observed
        if isinstance(o, RequestDecided) and o.admission is Admission.DUPLICATE
    ]
    assert [detail.split(",")[0] for detail in refusals] == [
        "RequestID counter 7 is not above 7",
        "RequestID counter 6 is not above 7",
    ]


def test_a_repeat_of_a_request_still_being_committed_is_a_duplicate_too() -> None:
    desk = Desk(hold=True)
    desk.send(IMPORT_SUPPLIER, read(7))
    desk.send(IMPORT_SUPPLIER, read(7))
    out = desk.commit()
    assert desk.answers_to(IMPORT_SUPPLIER, out) == [
        ResponseCode.ACKNOWLEDGED,
        ResponseCode.DUPLICATE_REQUEST_ID,
    ]
    assert desk.commands(out) == [TOPICS.command(METER)]


def test_a_redelivery_of_a_request_this_process_answered_is_dropped(desk: Desk) -> None:
    desk.send(IMPORT_SUPPLIER, read(7))
    assert desk.send(IMPORT_SUPPLIER, read(7), redelivered=True) == []
    assert desk.acknowledged == [0, 1]


def test_a_redelivery_after_a_restart_is_routed_again_and_forwarded_at_most_once(desk: Desk) -> None:
    # The earlier process committed and may have died before publishing: its answers are given again
    # (at least once), but a forward the store holds is not sent to the device a second time, even one
    # whose command never left (that one gets its E21: at most once to the device).
    desk.send(IMPORT_SUPPLIER, set_flag(6))
    payload = request(SECURITY_SRV, IMPORT_SUPPLIER, METER, 7)  # forwarded, flag or not
    desk.send(IMPORT_SUPPLIER, payload)
    refused = read(9)
    desk.send(IMPORT_SUPPLIER, refused)
    unsent = request(SECURITY_SRV, IMPORT_SUPPLIER, METER, 10)
    desk.hold = True
    desk.send(IMPORT_SUPPLIER, unsent)
    desk.crash_after_commit()  # 10 is stored; the process dies before its command leaves
    desk.hold = False
    again = desk.send(IMPORT_SUPPLIER, payload, redelivered=True)
    assert desk.commands(again) == []
    assert desk.answers_to(IMPORT_SUPPLIER, again) == [ResponseCode.ACKNOWLEDGED]
    never_left = desk.send(IMPORT_SUPPLIER, unsent, redelivered=True)
    assert desk.commands(never_left) == []
    assert desk.answers_to(IMPORT_SUPPLIER, never_left) == [ResponseCode.ACKNOWLEDGED]
    timed_out = desk.pass_time(30.0)
    assert desk.answers_to(IMPORT_SUPPLIER, timed_out).count(ResponseCode.DEVICE_TIMEOUT) == 2
    assert desk.answers_to(IMPORT_SUPPLIER, desk.send(IMPORT_SUPPLIER, refused, redelivered=True)) == [
        ResponseCode.CONSUMER_CHOICE
    ]
    fresh_copy = desk.send(IMPORT_SUPPLIER, payload)
    assert desk.answers_to(IMPORT_SUPPLIER, fresh_copy) == [ResponseCode.DUPLICATE_REQUEST_ID]


def test_the_flag_and_the_counters_survive_a_restart(desk: Desk) -> None:
    desk.send(IMPORT_SUPPLIER, set_flag(5))
    desk.restart()
    assert desk.answers_to(IMPORT_SUPPLIER, desk.send(IMPORT_SUPPLIER, read(6))) == [
        ResponseCode.CONSUMER_CHOICE
    ]
    assert desk.answers_to(IMPORT_SUPPLIER, desk.send(IMPORT_SUPPLIER, read(5))) == [
        ResponseCode.DUPLICATE_REQUEST_ID
    ]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"<not-xml", "not-well-formed"),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>', "doctype-forbidden"),
        (b"\xff\xfe garbage", "invalid-encoding"),
    ],
)
def test_bad_input_is_dead_lettered_with_its_reason(desk: Desk, payload: bytes, reason: str) -> None:
    out = desk.send(IMPORT_SUPPLIER, payload)
    letters = [json.loads(p.payload) for p in out if p.topic == TOPICS.deadletter]
    assert len(letters) == 1
    assert letters[0]["reason"] == reason
    assert base64.b64decode(letters[0]["payload_base64"]) == payload
    # No RequestID to answer: no valid DUIS answer can be made, the dead letter is the only trace.
    assert desk.answers_to(IMPORT_SUPPLIER, out) == []


def test_an_unparseable_request_with_a_readable_header_is_answered_e4(desk: Desk) -> None:
    payload = re.sub(rb"(?s)<sr:Body>.*</sr:Body>", b"<sr:Body/>", read(5))
    out = desk.send(IMPORT_SUPPLIER, payload)
    assert [json.loads(p.payload)["reason"] for p in out if p.topic == TOPICS.deadletter] == ["missing-field"]
    assert desk.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.INVALID_REQUEST]


def test_a_request_for_an_srv_duis_lacks_is_dead_lettered_unanswered(desk: Desk) -> None:
    payload = read(5).replace(b">4.8.1<", b">99.9.9<")
    assert payload != read(5)
    out = desk.send(IMPORT_SUPPLIER, payload)
    assert [json.loads(p.payload)["reason"] for p in out if p.topic == TOPICS.deadletter] == ["unknown-srv"]
    assert desk.answers_to(IMPORT_SUPPLIER, out) == []
    assert desk.commands(out) == []


@settings(max_examples=30, deadline=None)
@given(size=st.integers(min_value=0, max_value=3 * DEADLETTER_PAYLOAD_BYTES), reason=st.text(max_size=5000))
def test_a_dead_letter_always_fits_and_names_what_it_dropped(size: int, reason: str) -> None:
    payload = b"<" + b"x" * size
    letter = json.loads(
        gateway.router.deadletter_payload(Received(0, "dsp/in/x", payload), reason, reason * 3)
    )
    assert len(base64.b64decode(letter["payload_base64"])) == min(len(payload), DEADLETTER_PAYLOAD_BYTES)
    assert letter["payload_bytes"] == len(payload)
    assert letter["payload_truncated"] == (len(payload) > DEADLETTER_PAYLOAD_BYTES)
    assert len(letter["detail"]) <= 1024


def test_a_message_on_a_topic_that_is_not_an_eui_is_dead_lettered(desk: Desk) -> None:
    [letter] = desk.receive("dsp/in/not-an-eui", b"<x/>")
    assert letter.topic == TOPICS.deadletter
    assert json.loads(letter.payload)["reason"] == "bad-topic"


def test_an_unknown_device_is_rejected_with_e19(desk: Desk) -> None:
    out = desk.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, UNKNOWN_METER, 1))
    assert desk.commands(out) == []
    assert desk.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.UNKNOWN_DEVICE]


# -- a failed commit leaves no trace -------------------------------------------------------------


def test_a_failed_commit_is_answered_and_the_retry_is_decided_as_new() -> None:
    desk = Desk(hold=True)
    desk.send(IMPORT_SUPPLIER, read(1))
    out = desk.commit(error="OperationalError: database or disk is full")
    assert desk.commands(out) == []
    assert desk.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.STORE_FAILED]
    assert b"disk is full" in out[0].payload
    assert desk.acknowledged == [0]
    assert desk.router.pending == {}
    assert desk.durable.counters == {}
    [rolled_back] = [o for o in desk.observed if isinstance(o, CommitRolledBack)]
    assert "disk is full" in rolled_back.error
    assert not [o for o in desk.observed if isinstance(o, RequestDecided)]  # no outcome to record
    desk.send(IMPORT_SUPPLIER, read(1))
    retried = desk.commit()
    assert desk.answers_to(IMPORT_SUPPLIER, retried) == [ResponseCode.ACKNOWLEDGED]
    assert desk.commands(retried) == [TOPICS.command(METER)]
    desk.pass_time(60)  # forwarded for real this time: pending, then timed out once its claim is durable
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == [ResponseCode.DEVICE_TIMEOUT]


def test_a_failed_flag_commit_leaves_the_flag_as_it_was_and_later_messages_flow() -> None:
    desk = Desk(hold=True)
    desk.send(IMPORT_SUPPLIER, set_flag(1))
    desk.read()
    desk.send(IMPORT_SUPPLIER, read(2))  # held behind the flag request
    out = desk.commit(error="disk full")
    assert desk.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.STORE_FAILED]
    assert desk.agree() == frozenset()
    out = desk.commit()
    assert desk.commands(out) == [TOPICS.command(METER)]  # the flag never took effect
    desk.send(IMPORT_SUPPLIER, set_flag(3))  # the supplier sends it again
    desk.read()
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == [ResponseCode.SUCCESS]
    assert desk.agree() == {METER}


def test_a_failed_store_read_answers_the_flag_request_and_changes_nothing() -> None:
    desk = Desk(hold=True)
    desk.send(IMPORT_SUPPLIER, set_flag(1))
    out = desk.read(error="OperationalError: unable to open database file")
    assert desk.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.STORE_FAILED]
    assert desk.durable.history == []
    assert desk.router.counters == {}


def test_a_failed_commit_keeps_the_counters_of_commits_still_in_flight() -> None:
    desk = Desk(hold=True)
    desk.send(IMPORT_SUPPLIER, read(1))
    first = list(desk.waiting_commits)
    desk.waiting_commits.clear()
    desk.send(IMPORT_SUPPLIER, read(2))
    desk.waiting_commits.extendleft(first)
    # Only the first fails; the second is still in flight and holds counter 2.
    failed = desk.waiting_commits.popleft()
    desk.feed(gateway.router.CommitFailed((failed.batch,), "disk full"))
    assert desk.router.counters == {IMPORT_SUPPLIER: 2}
    desk.commit()
    desk.commit()  # the withdrawal of 1's forward, in a commit of its own
    # Counter 2 is durable now: a retry of 1 comes too late, as DUIS's rising counters require.
    assert desk.answers_to(IMPORT_SUPPLIER, desk.send(IMPORT_SUPPLIER, read(1))) == [
        ResponseCode.DUPLICATE_REQUEST_ID
    ]


# -- device responses, alerts, timeouts ------------------------------------------------------------


def test_the_device_response_reaches_the_originator(desk: Desk) -> None:
    desk.send(IMPORT_SUPPLIER, read(1))
    answer = meter_reading_answer(1)
    assert desk.device_says(METER, answer) == [Publish(TOPICS.out(IMPORT_SUPPLIER), answer)]
    assert desk.router.pending == {}


def test_consumption_data_answering_after_the_flag_was_set_is_withheld(desk: Desk) -> None:
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.send(IMPORT_SUPPLIER, set_flag(2))
    answer = meter_reading_answer(1)
    out = desk.device_says(METER, answer)
    assert desk.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.CONSUMER_CHOICE]
    assert answer not in [p.payload for p in out]
    # Reported as the user experienced it: a consumer-choice exception, not a device success.
    [routed] = [o for o in desk.observed if isinstance(o, DeviceMessageRouted)]
    assert (routed.delivery, routed.outcome) == ("withhold", "withheld")


def test_a_response_from_another_device_than_the_target_is_dead_lettered(desk: Desk) -> None:
    out = desk.device_says(HUB, meter_reading_answer(1))
    assert [p.topic for p in out] == [TOPICS.deadletter]
    assert json.loads(out[0].payload)["reason"] == "response-mismatch"


def test_alerts_from_a_flagged_meter_flow_without_consumption_payloads(desk: Desk) -> None:
    desk.send(IMPORT_SUPPLIER, set_flag(1))
    suppliers = [TOPICS.out(IMPORT_SUPPLIER)]  # an ESME's unsolicited alerts go to its import supplier
    tamper = alert(METER, "81BC")  # Strong Magnetic Field Removed: security
    assert desk.device_says(METER, tamper) == [Publish(topic, tamper) for topic in suppliers]
    # Billing Data Log Updated is Critical: it arrives, without the register snapshot.
    [redacted] = desk.device_says(METER, alert(METER, "8F0A", 2))
    assert isinstance(redacted, Publish)
    assert redacted.topic == TOPICS.out(IMPORT_SUPPLIER)
    assert b"<sr:GBCSPayload/>" in redacted.payload
    assert b"<sr:AlertCode>8F0A</sr:AlertCode>" in redacted.payload
    desk.send(IMPORT_SUPPLIER, clear_flag(2))
    billing = alert(METER, "8F0A", 3)
    assert desk.device_says(METER, billing) == [Publish(topic, billing) for topic in suppliers]


def test_a_silent_device_gets_its_request_answered_with_a_timeout_once() -> None:
    desk = Desk(target_response_seconds=30.0)
    desk.send(IMPORT_SUPPLIER, read(1))
    assert desk.pass_time(29.0) == []
    out = desk.pass_time(1.0)
    assert desk.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.DEVICE_TIMEOUT]
    assert [type(o) for o in desk.observed].count(RequestTimedOut) == 1
    assert desk.device_says(METER, meter_reading_answer(1)) == []  # late: dropped
    assert desk.pass_time(60.0) == []


def test_the_timeout_clock_starts_when_the_forward_is_durable() -> None:
    desk = Desk(hold=True, target_response_seconds=30.0)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.seconds = 100.0  # a slow commit
    desk.commit()
    desk.pass_time(29.0)
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == []  # not yet due: nothing claimed
    desk.pass_time(1.0)
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == [ResponseCode.DEVICE_TIMEOUT]


def test_every_decision_is_observed_with_what_the_outcome_record_needs(desk: Desk) -> None:
    desk.send(IMPORT_SUPPLIER, set_flag(1))
    desk.send(IMPORT_SUPPLIER, read(2))
    desk.send(IMPORT_SUPPLIER, read(2))
    desk.send(IMPORT_SUPPLIER, request(SECURITY_SRV, IMPORT_SUPPLIER, METER, 3))
    decided = [o for o in desk.observed if isinstance(o, RequestDecided)]
    assert [(o.srv, o.action.value, o.response_code, o.flagged, o.flag_outcome) for o in decided] == [
        ("8.15.1", "handle-locally", "I0", False, "accepted"),
        (CONSUMPTION_SRV, "refuse", "E169", True, None),
        (CONSUMPTION_SRV, "reject", "E16901", False, None),
        (SECURITY_SRV, "forward", "I99", True, None),
    ]
    rule = default_table().srvs[CONSUMPTION_SRV]
    user_roles = {role.value for user in USERS if user.user_id == IMPORT_SUPPLIER for role in user.roles}
    assert decided[1].role in user_roles & {role.value for role in rule.eligible_roles}


def test_every_message_is_acknowledged_once_in_arrival_order(desk: Desk) -> None:
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.send(IMPORT_SUPPLIER, b"<garbage")
    desk.send(IMPORT_SUPPLIER, set_flag(2))
    desk.device_says(METER, meter_reading_answer(1))
    desk.receive("elsewhere/x", b"")
    assert desk.acknowledged == [0, 1, 2, 3, 4]
    assert desk.router.unreleased == 0


def test_two_routers_sharing_a_store_act_on_a_request_id_once(desk: Desk) -> None:
    # The same request handed to two instances (a user's repeat across a shared subscription): both
    # decide it new from their own memory; the store records the RequestID for one of them.
    first, other, third = (Desk(desk.durable, hold=True) for _ in range(3))
    first.send(IMPORT_SUPPLIER, read(2))
    other.send(IMPORT_SUPPLIER, read(2))
    forwarded = first.commit()
    refused = other.commit()
    assert desk.commands(forwarded) == [TOPICS.command(METER)]
    assert desk.commands(refused) == []
    assert desk.answers_to(IMPORT_SUPPLIER, refused) == [ResponseCode.DUPLICATE_REQUEST_ID]
    assert other.router.pending == {}
    assert other.acknowledged == [0]
    [decided] = [o for o in other.observed if isinstance(o, RequestDecided)]
    assert decided.admission == "duplicate"
    # A lower counter that reaches a third instance after 2 was committed is still acted on: counters
    # arrive out of order between instances, and only the RequestID itself is checked across them.
    third.send(IMPORT_SUPPLIER, read(1))
    assert desk.commands(third.commit()) == [TOPICS.command(METER)]


# -- one final answer per request, whichever instance hears the device ---------------------------


def _final_answers(user: Eui, *desks: Desk) -> list[str]:
    return [code for desk in desks for code in desk.answers_to(user, desk.published) if code != "I99"]


def test_a_device_answer_heard_by_another_instance_is_the_one_final_answer() -> None:
    durable = Durable.of()
    forwarding, other = Desk(durable), Desk(durable)
    forwarding.send(IMPORT_SUPPLIER, read(1))
    answer = meter_reading_answer(1)
    assert other.device_says(METER, answer) == [Publish(TOPICS.out(IMPORT_SUPPLIER), answer)]
    # The forwarding instance's own timer runs out later: its E21 claim fails, nothing is published.
    assert forwarding.pass_time(60.0) == []
    assert _final_answers(IMPORT_SUPPLIER, forwarding, other) == [ResponseCode.SUCCESS]


def test_a_device_answer_after_the_e21_is_late_wherever_it_is_heard() -> None:
    durable = Durable.of()
    forwarding, other = Desk(durable), Desk(durable)
    forwarding.send(IMPORT_SUPPLIER, read(1))
    assert forwarding.answers_to(IMPORT_SUPPLIER, forwarding.pass_time(30.0)) == [ResponseCode.DEVICE_TIMEOUT]
    assert other.device_says(METER, meter_reading_answer(1)) == []
    [late] = [o for o in other.observed if isinstance(o, DeviceMessageRouted)]
    assert late.delivery == "late"
    assert _final_answers(IMPORT_SUPPLIER, forwarding, other) == [ResponseCode.DEVICE_TIMEOUT]


def test_a_dead_instances_forwards_are_timed_out_once_by_the_survivors() -> None:
    durable = Durable.of()
    dead, first, second = Desk(durable), Desk(durable), Desk(durable)
    for counter in (1, 2, 3):
        dead.send(IMPORT_SUPPLIER, read(counter))
    # Both survivors sweep past the deadline; the store lets each forward be claimed once.
    for survivor in (first, second):
        survivor.seconds = 31.0
    first.pass_time(0.0)
    second.pass_time(0.0)
    assert sorted(_final_answers(IMPORT_SUPPLIER, first, second)) == [ResponseCode.DEVICE_TIMEOUT] * 3
    assert durable.waiting == {}


def test_a_sweep_and_a_device_answer_racing_give_one_final_answer() -> None:
    durable = Durable.of()
    dead, sweeping, hearing = Desk(durable), Desk(durable, hold=True), Desk(durable, hold=True)
    dead.send(IMPORT_SUPPLIER, read(1))
    sweeping.seconds = 31.0
    sweeping.pass_time(0.0)  # its claim is in flight...
    hearing.device_says(METER, meter_reading_answer(1))  # ...and so is this one
    hearing.commit()  # the device's answer is claimed first
    sweeping.commit()
    assert _final_answers(IMPORT_SUPPLIER, sweeping, hearing) == [ResponseCode.SUCCESS]


def test_a_repeated_device_answer_is_dropped_and_a_redelivered_one_repeated() -> None:
    desk = Desk()
    desk.send(IMPORT_SUPPLIER, read(1))
    answer = meter_reading_answer(1)
    desk.device_says(METER, answer)
    assert desk.device_says(METER, answer) == []  # the device said it twice
    assert [o.delivery for o in desk.observed if isinstance(o, DeviceMessageRouted)] == [
        "deliver",
        "duplicate",
    ]
    # The broker's redelivery after a crash between the claim and the publish: at least once.
    redelivered = desk.receive(f"{TOPICS.devices}/{METER}/up", answer, redelivered=True)
    assert redelivered == [Publish(TOPICS.out(IMPORT_SUPPLIER), answer)]


def test_an_answer_to_a_request_nobody_forwarded_is_dead_lettered() -> None:
    desk = Desk()
    out = desk.device_says(METER, meter_reading_answer(7))
    assert [p.topic for p in out] == [TOPICS.deadletter]
    assert json.loads(out[0].payload)["reason"] == "unknown-request"


def test_a_redelivery_another_process_decided_is_decided_again() -> None:
    # A redelivered request this process never decided (its first delivery went to an instance that
    # died) is AGAIN, even below this process's live counter; one it decided itself is ANSWERED.
    durable = Durable.of()
    dead, survivor = Desk(durable, hold=True), Desk(durable)
    dead.send(IMPORT_SUPPLIER, read(1))  # decided, never committed: the instance dies
    survivor.send(IMPORT_SUPPLIER, read(2))
    again = survivor.send(IMPORT_SUPPLIER, read(1), redelivered=True)
    assert survivor.commands(again) == [TOPICS.command(METER)]
    assert survivor.send(IMPORT_SUPPLIER, read(2), redelivered=True) == []
    admissions = [o.admission for o in survivor.observed if isinstance(o, RequestDecided)]
    assert admissions == ["new", "again"]
    assert [type(o) for o in survivor.observed].count(DuplicateDelivery) == 1


# -- durable pending forwards ---------------------------------------------------------------------


def test_a_forward_of_a_crashed_process_is_timed_out_once_by_the_next() -> None:
    desk = Desk(target_response_seconds=30.0)
    desk.send(IMPORT_SUPPLIER, read(1))
    assert list(desk.durable.pending) == [RequestId(IMPORT_SUPPLIER, METER, 1)]
    desk.pass_time(10.0)
    desk.restart()  # the device is silent; the deadline is the one the first process stored
    assert desk.pass_time(19.0) == []
    assert desk.answers_to(IMPORT_SUPPLIER, desk.pass_time(1.0)) == [ResponseCode.DEVICE_TIMEOUT]
    # The E21 was claimed, then settled once it had left: a further restart does not answer it again.
    assert desk.durable.waiting == {}
    assert desk.durable.unsettled == set()
    desk.restart()
    assert desk.pass_time(60.0) == []


def test_a_device_answer_to_a_forward_of_a_crashed_process_is_its_final_answer() -> None:
    desk = Desk(target_response_seconds=30.0)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.restart()
    answer = meter_reading_answer(1)
    assert desk.device_says(METER, answer) == [Publish(TOPICS.out(IMPORT_SUPPLIER), answer)]
    assert desk.durable.waiting == {}
    assert desk.pass_time(60.0) == []
    desk.restart()
    assert desk.pass_time(60.0) == []


def test_a_device_answer_is_released_once_its_forward_left_the_store() -> None:
    desk = Desk(hold=True)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.commit()
    assert desk.device_says(METER, meter_reading_answer(1)) == []
    # Crash before that commit is heard of: the answer was never published nor acknowledged, so the
    # broker delivers it again, and the next process routes it as the final answer.
    desk.restart()
    assert len(desk.durable.waiting) == 1
    desk.device_says(METER, meter_reading_answer(1))
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == [ResponseCode.SUCCESS]
    assert desk.durable.waiting == {}


def test_an_answer_whose_claim_failed_is_claimed_again_and_holds_nothing_up() -> None:
    desk = Desk(hold=True)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.commit()
    desk.device_says(METER, meter_reading_answer(1))
    assert desk.commit(error="disk I/O error") == []  # not published: no claim holds
    assert desk.acknowledged == [0, 1]  # later messages are not held behind it
    desk.pass_time(1.0)
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == [ResponseCode.SUCCESS]
    assert desk.durable.answers == {RequestId(IMPORT_SUPPLIER, METER, 1): ANSWER_RESPONSE}


def test_an_answer_whose_claim_committed_unheard_is_still_given_once() -> None:
    # The claim committed, the gateway heard a failure: the retry finds the claim its own.
    desk = Desk(hold=True)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.commit()
    desk.device_says(METER, meter_reading_answer(1))
    assert desk.commit_lost("connection lost") == []
    desk.pass_time(1.0)
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == [ResponseCode.SUCCESS]
    desk.device_says(METER, meter_reading_answer(1))  # the device repeats itself: dropped
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == []


def test_an_answer_and_an_e21_claimed_together_unheard_give_the_answer_once() -> None:
    # The device answered as the timer ran out (the answer waited, e.g. for the cluster lease): both
    # claims go in one transaction that commits unheard. The store took the answer (responses are
    # claimed first); the retries find it this instance's, and the answer, not the E21, is given.
    desk = Desk(hold=True, target_response_seconds=30.0)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.commit()
    desk.pass_time(30.0)
    desk.device_says(METER, meter_reading_answer(1))
    assert desk.commit_lost("lease lost") == []
    desk.pass_time(1.0)
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == [ResponseCode.SUCCESS]
    desk.pass_time(60.0)
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == []


def test_an_e21_whose_claim_committed_unheard_is_still_given_once() -> None:
    desk = Desk(hold=True, target_response_seconds=30.0)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.commit()
    desk.pass_time(30.0)
    assert desk.commit_lost("connection lost") == []
    desk.pass_time(1.0)
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == [ResponseCode.DEVICE_TIMEOUT]
    desk.pass_time(1.0)
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == []


def test_an_answer_whose_claim_was_lost_is_not_given_after_the_e21() -> None:
    desk = Desk(hold=True, target_response_seconds=30.0)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.commit()
    desk.device_says(METER, meter_reading_answer(1))
    desk.commit(error="connection lost")
    # Meanwhile (another instance's sweep) the forward was answered E21.
    desk.durable.answers[RequestId(IMPORT_SUPPLIER, METER, 1)] = ANSWER_TIMEOUT
    desk.pass_time(1.0)
    assert desk.commit() == []
    assert [o.delivery for o in desk.observed if isinstance(o, DeviceMessageRouted)] == ["late"]


def test_a_forward_whose_commit_outcome_was_lost_is_withdrawn_and_may_be_sent_again() -> None:
    # The store committed it, the gateway heard a failure and answered "send it again": the next
    # commit withdraws the forward and its RequestID, so no E21 follows and the retry is new.
    desk = Desk(hold=True, target_response_seconds=30.0)
    desk.send(IMPORT_SUPPLIER, read(1))
    out = desk.commit_lost("connection lost")
    assert desk.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.STORE_FAILED]
    assert desk.commands(out) == []
    desk.pass_time(1.0)
    desk.commit()
    assert desk.durable.waiting == {}
    desk.pass_time(60.0)
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == []
    desk.send(IMPORT_SUPPLIER, read(1))
    assert desk.commands(desk.commit()) == [TOPICS.command(METER)]


def test_a_crash_between_an_e21_claim_and_its_settlement_repeats_the_e21() -> None:
    # The stated at-least-once case: the E21 was claimed and may have left; its settlement was not
    # durable yet. The next process's sweep finds the unsettled claim and gives the E21 again.
    desk = Desk(hold=True, target_response_seconds=30.0)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.commit()
    desk.pass_time(30.0)
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == [ResponseCode.DEVICE_TIMEOUT]
    desk.pass_time(1.0)
    assert [commit.settled for commit in desk.waiting_commits] == [(RequestId(IMPORT_SUPPLIER, METER, 1),)]
    desk.restart()
    desk.pass_time(1.0)
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == [ResponseCode.DEVICE_TIMEOUT]
    desk.pass_time(1.0)
    desk.commit()  # settled now: no process gives it again
    desk.restart()
    desk.pass_time(60.0)
    assert desk.answers_to(IMPORT_SUPPLIER, desk.commit()) == []


# -- bounded work ---------------------------------------------------------------------------------


def gas_read(counter: int) -> bytes:
    # 6.2.8 Read Device Configuration (Gas): a read DUIS addresses to the GSME itself (its
    # consumption reads address the GPF: E11 to the GSME).
    return request("6.2.8", GAS_SUPPLIER, GAS_METER, counter)


def test_a_user_at_its_forward_limit_is_answered_busy_and_others_are_still_served() -> None:
    desk = Desk(max_forwards_per_user=2)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.send(IMPORT_SUPPLIER, read(2))
    busy = desk.send(IMPORT_SUPPLIER, read(3))
    assert desk.answers_to(IMPORT_SUPPLIER, busy) == [ResponseCode.GATEWAY_BUSY]
    assert desk.commands(busy) == []
    assert desk.commands(desk.send(GAS_SUPPLIER, gas_read(1))) == [TOPICS.command(GAS_METER)]
    # A device answer frees a place; the refused RequestID left no trace and may come again.
    desk.device_says(METER, meter_reading_answer(1))
    assert desk.commands(desk.send(IMPORT_SUPPLIER, read(3))) == [TOPICS.command(METER)]
    assert desk.answers_to(IMPORT_SUPPLIER, desk.send(IMPORT_SUPPLIER, read(4))) == [
        ResponseCode.GATEWAY_BUSY
    ]
    desk.pass_time(30.0)  # timeouts free places too
    assert desk.commands(desk.send(IMPORT_SUPPLIER, read(4))) == [TOPICS.command(METER)]


def test_the_forward_limit_of_all_users_holds_across_a_restart() -> None:
    desk = Desk(max_forwards=2)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.send(GAS_SUPPLIER, gas_read(1))
    desk.restart()
    assert desk.answers_to(GAS_SUPPLIER, desk.send(GAS_SUPPLIER, gas_read(2))) == [ResponseCode.GATEWAY_BUSY]
    # Requests that are not forwarded are not limited.
    assert desk.answers_to(IMPORT_SUPPLIER, desk.send(IMPORT_SUPPLIER, set_flag(2))) == [ResponseCode.SUCCESS]


def test_a_failed_forward_frees_its_place() -> None:
    desk = Desk(hold=True, max_forwards_per_user=1)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.commit(error="disk I/O error")
    desk.send(IMPORT_SUPPLIER, read(1))
    assert desk.commands(desk.commit()) == [TOPICS.command(METER)]


def test_a_forward_routed_again_after_a_restart_takes_no_second_place_and_is_not_sent_again() -> None:
    desk = Desk(max_forwards_per_user=1)
    desk.send(IMPORT_SUPPLIER, read(1))
    desk.restart()
    again = desk.send(IMPORT_SUPPLIER, read(1), redelivered=True)
    # Stored already: not sent again; the user is acknowledged again.
    assert desk.commands(again) == []
    assert desk.answers_to(IMPORT_SUPPLIER, again) == [ResponseCode.ACKNOWLEDGED]
    desk.device_says(METER, meter_reading_answer(1))
    assert desk.commands(desk.send(IMPORT_SUPPLIER, read(2))) == [TOPICS.command(METER)]


# -- signatures (the shell checks them; the router acts on the verdict) -------------------------------


def test_a_request_whose_signature_failed_is_answered_and_changes_nothing(desk: Desk) -> None:
    forged = Verification("signature-missing", "no ds:Signature", None, None)
    out = desk.send(
        IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 5, METER, set_flag=True), verification=forged
    )
    assert desk.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.SIGNATURE_MISSING]
    # No flag was set and the RequestID counter was not taken: the next read with it is forwarded.
    assert desk.commands(desk.send(IMPORT_SUPPLIER, read(5))) == [TOPICS.command(METER)]


def test_a_verified_request_is_read_from_the_verifiers_tree(desk: Desk) -> None:
    payload = read(5)
    tree = etree.fromstring(read(6), document_parser())  # deliberately another document: proves which is read
    verified = Verification("verified", "", IMPORT_SUPPLIER, 1, tree)
    out = desk.send(IMPORT_SUPPLIER, payload, verification=verified)
    [command] = [p for p in out if p.topic == TOPICS.command(METER)]
    assert command.payload == payload  # forwarded as received
    [answer] = [p for p in out if p.topic == TOPICS.out(IMPORT_SUPPLIER)]
    assert f"{IMPORT_SUPPLIER}:{METER}:6".encode() in answer.payload
