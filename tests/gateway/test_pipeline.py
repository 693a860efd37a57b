"""The routing pipeline end to end in memory: a real SQLite store, the packaged rules, no broker.

Every test sends DUIS messages to `Pipeline.handle` as the transport would and looks at what was
published, to which topic, with which DUIS response code.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest
from lxml import etree

from gateway.duis import PARSER
from gateway.metrics import Metrics
from gateway.outcomes.queries import read_records
from gateway.outcomes.recorder import OutcomeRecorder
from gateway.pipeline import Pipeline
from gateway.responses import response_xml
from gateway.store import CommitBatch, SqliteStore, connect
from gateway.topics import Topics
from gateway.transport import Message
from gateway.view import RoutingView
from rules.codes import ResponseCode
from rules.domain import Eui, RequestId
from rules.table import default_table
from simulator.devices import device_alert_xml
from simulator.traffic import load_templates, render
from tests.gateway.test_inventory import (
    EXPORT_SUPPLIER,
    GAS_SUPPLIER,
    HUB,
    IMPORT_SUPPLIER,
    METER,
    NEW_SUPPLIER,
    USERS,
    premise,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

DCC = Eui("90-B3-D5-1F-30-00-00-02")
UNKNOWN_METER = Eui("00-DB-12-34-56-78-99-99")
AT = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
TEMPLATES = load_templates()
SR = "{http://www.dccinterface.co.uk/ServiceUserGateway}"
TOPICS = Topics()

CONSUMPTION_SRV = "4.8.1"  # Read Instantaneous Import Registers
FIRMWARE_SRV = "11.1"  # Update Firmware (non-device, DCC target)
SECURITY_SRV = "6.15.1"  # Update Security Credentials (KRP)


def request(srv: str, originator: Eui, target: Eui, counter: int, **fields: str) -> bytes:
    return render(TEMPLATES[srv], RequestId(originator, target, counter), fields)


def flag_request(
    originator: Eui, counter: int, device: Eui, *, set_flag: bool, declared: bool = True
) -> bytes:
    fields = {"DeviceID": device}
    if set_flag:
        fields["AllReasonableStepsTaken"] = "true" if declared else "false"
    return request("8.15.1" if set_flag else "8.15.2", originator, DCC, counter, **fields)


def meter_reading_answer(counter: int) -> bytes:
    """The meter's I0 answer to the import supplier's consumption read `counter`."""
    return response_xml(
        request_id=RequestId(IMPORT_SUPPLIER, METER, counter),
        code=ResponseCode.SUCCESS,
        service_reference=None,
        srv=CONSUMPTION_SRV,
        at=AT,
    )


def header(payload: bytes) -> tuple[str | None, str | None]:
    """(RequestID, ResponseCode) of a DUIS document, None where absent or unreadable."""
    try:
        root = etree.fromstring(payload, PARSER)
    except etree.XMLSyntaxError:
        return None, None
    return root.findtext(f"{SR}Header/{SR}RequestID"), root.findtext(f"{SR}Header/{SR}ResponseCode")


def response_code(payload: bytes) -> str:
    code = header(payload)[1]
    assert code is not None
    return code


@dataclass
class Harness:
    store: SqliteStore
    pipeline: Pipeline
    published: list[tuple[str, bytes]] = field(default_factory=list)

    async def send(self, user: Eui, payload: bytes, *, redelivered: bool = False) -> list[tuple[str, bytes]]:
        start = len(self.published)
        await self.pipeline.handle(Message(f"dsp/in/{user}", payload, redelivered))
        return self.published[start:]

    async def device_says(self, device: Eui, payload: bytes) -> list[tuple[str, bytes]]:
        start = len(self.published)
        await self.pipeline.handle(Message(f"dsp/device/{device}/up", payload))
        return self.published[start:]

    def answers_to(self, user: Eui, messages: list[tuple[str, bytes]]) -> list[str]:
        return [response_code(payload) for topic, payload in messages if topic == TOPICS.out(user)]

    @staticmethod
    def commands(messages: list[tuple[str, bytes]]) -> list[str]:
        return [topic for topic, _ in messages if topic.endswith("/cmd")]


async def seed(path: Path) -> None:
    """A store holding one premise (comms hub, ESME, GSME) and the users."""
    async with SqliteStore(path) as store:
        await store.upsert_devices(premise())
        await store.upsert_users(USERS)


async def build(
    path: Path,
    *,
    target_response_seconds: float = 30.0,
    recorder: OutcomeRecorder | None = None,
    store_class: type[SqliteStore] = SqliteStore,
) -> Harness:
    store = store_class(path)
    await store.open()
    published: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes) -> None:
        published.append((topic, payload))

    pipeline = Pipeline(
        table=default_table(),
        view=await RoutingView.load(store),
        store=store,
        publish=publish,
        recorder=recorder,
        metrics=Metrics(),
        dcc_eui=DCC,
        target_response_seconds=target_response_seconds,
        clock=lambda: AT,
        counters=await store.load_request_counters(),
    )
    pipeline.start()
    return Harness(store, pipeline, published)


async def stop(harness: Harness) -> None:
    await harness.pipeline.stop()
    await harness.store.close()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Harness]:
    await seed(tmp_path / "gw.sqlite3")
    harness = await build(tmp_path / "gw.sqlite3")
    yield harness
    await stop(harness)


async def test_a_consumption_read_is_forwarded_and_acknowledged(gateway: Harness) -> None:
    payload = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1)
    out = await gateway.send(IMPORT_SUPPLIER, payload)
    assert out[0] == (TOPICS.command(METER), payload)
    assert gateway.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.ACKNOWLEDGED]


async def test_a_flagged_device_refuses_consumption_but_not_security_or_firmware(gateway: Harness) -> None:
    set_out = await gateway.send(IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 1, METER, set_flag=True))
    assert gateway.answers_to(IMPORT_SUPPLIER, set_out) == [ResponseCode.SUCCESS]

    refused = await gateway.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 2))
    assert gateway.commands(refused) == []
    assert gateway.answers_to(IMPORT_SUPPLIER, refused) == [ResponseCode.CONSUMER_CHOICE]
    assert b"consumer" in refused[0][1]

    security = await gateway.send(IMPORT_SUPPLIER, request(SECURITY_SRV, IMPORT_SUPPLIER, METER, 3))
    assert gateway.commands(security) == [TOPICS.command(METER)]
    firmware = await gateway.send(
        IMPORT_SUPPLIER, request(FIRMWARE_SRV, IMPORT_SUPPLIER, DCC, 4, DeviceIDList=METER)
    )
    assert gateway.commands(firmware) == [TOPICS.command(DCC)]


async def test_the_flag_is_refused_to_a_supplier_that_is_not_responsible(gateway: Harness) -> None:
    out = await gateway.send(NEW_SUPPLIER, flag_request(NEW_SUPPLIER, 1, METER, set_flag=True))
    assert gateway.answers_to(NEW_SUPPLIER, out) == [ResponseCode.NOT_RESPONSIBLE_SUPPLIER]
    read = await gateway.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1))
    assert gateway.commands(read) == [TOPICS.command(METER)]


async def test_a_flag_without_the_declaration_is_refused(gateway: Harness) -> None:
    out = await gateway.send(
        IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 1, METER, set_flag=True, declared=False)
    )
    assert gateway.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.FLAG_DECLARATION_MISSING]
    assert not gateway.pipeline.view.is_flagged(METER)


async def test_clearing_the_flag_restores_forwarding_and_both_are_in_the_history(gateway: Harness) -> None:
    await gateway.send(IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 1, METER, set_flag=True))
    cleared = await gateway.send(IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 2, METER, set_flag=False))
    assert gateway.answers_to(IMPORT_SUPPLIER, cleared) == [ResponseCode.SUCCESS]
    read = await gateway.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 3))
    assert gateway.commands(read) == [TOPICS.command(METER)]
    history = await gateway.store.flag_history(METER)
    assert [(event.set, event.outcome) for event in history] == [(True, "accepted"), (False, "accepted")]


async def test_requests_decided_after_a_flag_set_are_refused_even_when_concurrent(gateway: Harness) -> None:
    before = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1)
    flag = flag_request(IMPORT_SUPPLIER, 2, METER, set_flag=True)
    after = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 3)
    await asyncio.gather(
        gateway.send(IMPORT_SUPPLIER, before),
        gateway.send(IMPORT_SUPPLIER, flag),
        gateway.send(IMPORT_SUPPLIER, after),
    )
    commands = gateway.commands(gateway.published)
    assert commands == [TOPICS.command(METER)]
    assert gateway.answers_to(IMPORT_SUPPLIER, gateway.published) == [
        ResponseCode.ACKNOWLEDGED,
        ResponseCode.SUCCESS,
        ResponseCode.CONSUMER_CHOICE,
    ]
    # The command for the earlier request left before the supplier held the flag's acknowledgement.
    topics = [topic for topic, _ in gateway.published]
    assert topics.index(TOPICS.command(METER)) < topics.index(TOPICS.out(IMPORT_SUPPLIER), 1)


async def test_a_stream_with_flag_requests_is_decided_in_arrival_order(gateway: Harness) -> None:
    # Messages arrive one event-loop turn apart, as from a transport, while flag requests read the store.
    handlers = []
    for counter in range(1, 121):
        if counter % 20 == 0:
            payload = flag_request(IMPORT_SUPPLIER, counter, METER, set_flag=counter % 40 == 0)
        else:
            payload = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, counter)
        handlers.append(asyncio.create_task(gateway.send(IMPORT_SUPPLIER, payload)))
        await asyncio.sleep(0)
    await asyncio.gather(*handlers)
    codes = gateway.answers_to(IMPORT_SUPPLIER, gateway.published)
    assert ResponseCode.DUPLICATE_REQUEST_ID not in codes
    assert len(codes) == 120
    # Flag set at 40 and 80 (cleared at 20, 60, 100): reads 41-59 and 81-99 refused, the rest forwarded.
    refused = set(range(41, 60)) | set(range(81, 100))
    assert codes.count(ResponseCode.CONSUMER_CHOICE) == len(refused)


async def test_a_spoofed_originator_is_answered_on_the_senders_topic_only(gateway: Harness) -> None:
    out = await gateway.send(GAS_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1))
    assert gateway.commands(out) == []
    assert [topic for topic, _ in out] == [TOPICS.out(GAS_SUPPLIER)]
    assert gateway.answers_to(GAS_SUPPLIER, out) == [ResponseCode.USER_NOT_AUTHORISED]
    # The victim's counter is untouched: its own request 1 still goes through.
    real = await gateway.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1))
    assert gateway.commands(real) == [TOPICS.command(METER)]


async def test_a_repeated_request_id_is_refused_and_never_forwarded_twice(gateway: Harness) -> None:
    payload = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 7)
    await gateway.send(IMPORT_SUPPLIER, payload)
    again = await gateway.send(IMPORT_SUPPLIER, payload)
    lower = await gateway.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 6))
    assert gateway.commands(again + lower) == []
    assert gateway.answers_to(IMPORT_SUPPLIER, again + lower) == [ResponseCode.DUPLICATE_REQUEST_ID] * 2


async def test_a_redelivery_of_a_request_this_process_answered_is_dropped(gateway: Harness) -> None:
    payload = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 7)
    await gateway.send(IMPORT_SUPPLIER, payload)
    assert await gateway.send(IMPORT_SUPPLIER, payload, redelivered=True) == []


async def test_a_redelivery_after_a_restart_is_routed_again(tmp_path: Path, gateway: Harness) -> None:
    # The earlier process committed the counter and may have died before publishing: at least once.
    payload = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 7)
    await gateway.send(IMPORT_SUPPLIER, payload)
    await stop(gateway)
    restarted = await build(tmp_path / "gw.sqlite3")
    try:
        again = await restarted.send(IMPORT_SUPPLIER, payload, redelivered=True)
        assert again[0] == (TOPICS.command(METER), payload)
        fresh_copy = await restarted.send(IMPORT_SUPPLIER, payload)
        assert restarted.answers_to(IMPORT_SUPPLIER, fresh_copy) == [ResponseCode.DUPLICATE_REQUEST_ID]
    finally:
        await stop(restarted)


async def test_the_flag_and_the_counters_survive_a_restart(tmp_path: Path, gateway: Harness) -> None:
    await gateway.send(IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 5, METER, set_flag=True))
    await stop(gateway)
    restarted = await build(tmp_path / "gw.sqlite3")
    try:
        refused = await restarted.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 6))
        assert restarted.answers_to(IMPORT_SUPPLIER, refused) == [ResponseCode.CONSUMER_CHOICE]
        replayed = await restarted.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 5))
        assert restarted.answers_to(IMPORT_SUPPLIER, replayed) == [ResponseCode.DUPLICATE_REQUEST_ID]
    finally:
        await stop(restarted)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"<not-xml", "not-well-formed"),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>', "doctype-forbidden"),
        (b"\xff\xfe garbage", "invalid-encoding"),
    ],
)
async def test_bad_input_is_dead_lettered_with_its_reason_and_answered(
    gateway: Harness, payload: bytes, reason: str
) -> None:
    out = await gateway.send(IMPORT_SUPPLIER, payload)
    letters = [json.loads(body) for topic, body in out if topic == TOPICS.deadletter]
    assert len(letters) == 1
    assert letters[0]["reason"] == reason
    assert base64.b64decode(letters[0]["payload_base64"]) == payload
    assert gateway.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.INVALID_REQUEST]


async def test_a_message_on_a_topic_that_is_not_an_eui_is_dead_lettered(gateway: Harness) -> None:
    start = len(gateway.published)
    await gateway.pipeline.handle(Message("dsp/in/not-an-eui", b"<x/>"))
    [(topic, body)] = gateway.published[start:]
    assert topic == TOPICS.deadletter
    assert json.loads(body)["reason"] == "bad-topic"


async def test_an_unknown_device_is_rejected_with_e19(gateway: Harness) -> None:
    out = await gateway.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, UNKNOWN_METER, 1))
    assert gateway.commands(out) == []
    assert gateway.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.UNKNOWN_DEVICE]


async def test_the_device_response_reaches_the_originator(gateway: Harness) -> None:
    await gateway.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1))
    answer = meter_reading_answer(1)
    out = await gateway.device_says(METER, answer)
    assert out == [(TOPICS.out(IMPORT_SUPPLIER), answer)]
    assert gateway.pipeline.pending == 0


async def test_consumption_data_answering_after_the_flag_was_set_is_withheld(gateway: Harness) -> None:
    await gateway.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1))
    await gateway.send(IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 2, METER, set_flag=True))
    answer = meter_reading_answer(1)
    out = await gateway.device_says(METER, answer)
    assert gateway.answers_to(IMPORT_SUPPLIER, out) == [ResponseCode.CONSUMER_CHOICE]
    assert answer not in [payload for _, payload in out]


async def test_a_response_from_another_device_than_the_target_is_dead_lettered(gateway: Harness) -> None:
    answer = meter_reading_answer(1)
    out = await gateway.device_says(HUB, answer)
    assert [topic for topic, _ in out] == [TOPICS.deadletter]
    assert json.loads(out[0][1])["reason"] == "response-mismatch"


def alert(device: Eui, code: str, counter: int = 1) -> bytes:
    return device_alert_xml(response_id=f"{device}:{DCC}:{counter}", code=code, at=AT, gbcs_payload=b"\x01")


async def test_alerts_from_a_flagged_meter_flow_except_consumption_ones(gateway: Harness) -> None:
    await gateway.send(IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 1, METER, set_flag=True))
    suppliers = [TOPICS.out(IMPORT_SUPPLIER), TOPICS.out(EXPORT_SUPPLIER)]  # both responsible for an ESME
    tamper = alert(METER, "81BC")  # Strong Magnetic Field Removed: security
    assert await gateway.device_says(METER, tamper) == [(topic, tamper) for topic in suppliers]
    assert await gateway.device_says(METER, alert(METER, "8F0A", 2)) == []  # Billing Data Log Updated
    cleared = flag_request(IMPORT_SUPPLIER, 2, METER, set_flag=False)
    await gateway.send(IMPORT_SUPPLIER, cleared)
    billing = alert(METER, "8F0A", 3)
    assert await gateway.device_says(METER, billing) == [(topic, billing) for topic in suppliers]


async def test_a_silent_device_gets_its_request_answered_with_a_timeout(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite3"
    await seed(path)
    harness = await build(path, target_response_seconds=0.0)
    try:
        await harness.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1))
        assert await harness.pipeline.expire_pending() == 1
        assert harness.answers_to(IMPORT_SUPPLIER, harness.published[-1:]) == [ResponseCode.DEVICE_TIMEOUT]
        late = meter_reading_answer(1)
        assert await harness.device_says(METER, late) == []
    finally:
        await stop(harness)


async def test_outcomes_are_recorded_for_every_decision(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite3"
    await seed(path)
    recorder = OutcomeRecorder(path, clock=lambda: AT)
    await recorder.start()
    harness = await build(path, recorder=recorder)
    try:
        await harness.send(IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 1, METER, set_flag=True))
        await harness.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 2))
        await harness.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 2))
        await harness.send(IMPORT_SUPPLIER, request(SECURITY_SRV, IMPORT_SUPPLIER, METER, 3))
        await recorder.flush()
        db = await connect(path, read_only=True)
        try:
            records = await read_records(db, AT.replace(hour=0), AT.replace(hour=23))
        finally:
            await db.close()
    finally:
        await stop(harness)
        await recorder.close()
    assert [(r.srv, r.decision, r.response_code, r.flagged) for r in records] == [
        ("8.15.1", "handle-locally", "I0", False),
        (CONSUMPTION_SRV, "refuse", "E169", True),
        (CONSUMPTION_SRV, "reject", "E11", False),
        (SECURITY_SRV, "forward", "I99", True),
    ]


class FailingStore(SqliteStore):
    async def commit(self, batch: CommitBatch) -> None:
        raise OSError("disk full")


async def test_a_failed_commit_dead_letters_the_message_instead_of_losing_it(tmp_path: Path) -> None:
    await seed(tmp_path / "gw.sqlite3")
    harness = await build(tmp_path / "gw.sqlite3", store_class=FailingStore)
    payload = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1)
    try:
        published = await harness.send(IMPORT_SUPPLIER, payload)
    finally:
        await stop(harness)
    assert [topic for topic, _ in published] == [TOPICS.deadletter]
    letter = json.loads(published[0][1])
    assert letter["reason"] == "internal-error"
    assert "disk full" in letter["detail"]
    assert base64.b64decode(letter["payload_base64"]) == payload
