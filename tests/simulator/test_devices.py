"""The device simulator: answers, failures, timeouts, alerts and DCC schedules, on the in-memory broker."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from itertools import count

import pytest

from gateway.duis import parse_device_message
from gateway.transport import MemoryBroker, MemoryTransport
from rules.domain import DCC_EUI, DeviceMessage, DeviceMessageKind, DeviceType, RequestId
from simulator.devices import (
    ALERT_CODES,
    POWER_OUTAGE_DCC_ALERT,
    AlertClass,
    CommandOutcome,
    DeviceConfig,
    DeviceSimulator,
)
from simulator.estate import generate_estate
from simulator.traffic import load_templates, render

AT = datetime(2025, 3, 1, 2, 30, tzinfo=UTC)
SUPPLIER = "90-B3-D5-1F-30-01-00-01"
ESTATE = generate_estate(3, 20)
ESME = next(d for d in ESTATE.devices if d.device_type is DeviceType.ESME)
HUB = next(d for d in ESTATE.devices if d.device_type is DeviceType.CHF)


class Harness:
    """The simulator on one side of a MemoryBroker, a stand-in gateway on the other."""

    def __init__(self, config: DeviceConfig, devices=()) -> None:
        self.broker = MemoryBroker()
        self.sleeps: list[float] = []
        ticks = count(step=0.25)
        self.simulator = DeviceSimulator(
            MemoryTransport(self.broker, "devices"),
            config,
            devices=devices,
            clock=lambda: AT,
            monotonic=lambda: next(ticks),
            sleep=self._sleep,
        )
        self.gateway = MemoryTransport(self.broker, "gateway")
        self.up: list[tuple[str, DeviceMessage]] = []

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def _collect(self, message) -> None:
        parsed = parse_device_message(message.payload)
        assert isinstance(parsed, DeviceMessage), parsed
        self.up.append((message.topic, parsed))

    async def __aenter__(self):
        await self.simulator.start()
        await self.gateway.start(["dsp/device/+/up"], self._collect)
        return self

    async def __aexit__(self, *exc):
        await self.broker.drain()
        await self.simulator.stop()
        await self.gateway.stop()

    async def command(self, srv: str, counter: int, device=ESME.device_id, fields=None) -> RequestId:
        template = load_templates()[srv]
        target = DCC_EUI if template.command_variant == 8 else device
        request_id = RequestId(SUPPLIER, target, counter)
        await self.gateway.publish(f"dsp/device/{target}/cmd", render(template, request_id, fields))
        return request_id


async def test_answers_each_command_with_a_parseable_duis_response():
    async with Harness(DeviceConfig(latency_seconds=0.2)) as run:
        sent = [await run.command(srv, n) for n, srv in enumerate(("4.6.1", "11.3", "7.2"), start=10)]
        await run.broker.drain()
    topic = f"dsp/device/{ESME.device_id}/up"
    answers = [
        (topic, DeviceMessageKind.RESPONSE, "I0", request_id, srv, None)
        for request_id, srv in zip(sent, ("4.6.1", "11.3", "7.2"), strict=True)
    ]
    # 11.3 is future-dated (ExecutionDateTime) and the device reports its execution: 8F66, same RequestID.
    executed = (topic, DeviceMessageKind.DEVICE_ALERT, "I0", sent[1], "11.3", "8F66")
    assert [(topic, m.kind, m.response_code, m.request_id, m.srv, m.alert_code) for topic, m in run.up] == [
        answers[0],
        answers[1],
        executed,
        answers[2],
    ]
    assert run.sleeps == [0.2, 0.2, 0.2]
    assert [(r.device, r.request_id, r.srv, r.outcome) for r in run.simulator.received] == [
        (ESME.device_id, str(request_id), srv, CommandOutcome.ANSWERED)
        for request_id, srv in zip(sent, ("4.6.1", "11.3", "7.2"), strict=True)
    ]
    assert [r.t for r in run.simulator.received] == [0.0, 0.25, 0.5]


@pytest.mark.parametrize(
    ("config", "codes", "outcome"),
    [
        (DeviceConfig(failure_rate=1.0), ["E20"] * 5, CommandOutcome.FAILED),
        (DeviceConfig(timeout_rate=1.0), [], CommandOutcome.TIMED_OUT),
    ],
)
async def test_fails_or_ignores_the_configured_share(config, codes, outcome):
    async with Harness(config) as run:
        for n in range(5):
            await run.command("4.8.1", n + 1)
        await run.broker.drain()
    assert [m.response_code for _, m in run.up] == codes
    assert {r.outcome for r in run.simulator.received} == {outcome}
    assert len(run.simulator.received) == 5


async def test_a_partial_share_is_deterministic_for_a_seed():
    async def outcomes(seed: int) -> list[CommandOutcome]:
        async with Harness(DeviceConfig(failure_rate=0.3, timeout_rate=0.2, seed=seed)) as run:
            for n in range(200):
                await run.command("4.17", n + 1)
            await run.broker.drain()
        answered = {m.request_id.counter: m.response_code for _, m in run.up}
        for record in run.simulator.received:
            counter = int(record.request_id.rsplit(":", 1)[1])
            expected = {CommandOutcome.ANSWERED: "I0", CommandOutcome.FAILED: "E20"}.get(record.outcome)
            assert answered.get(counter) == expected
        return [record.outcome for record in run.simulator.received]

    first = await outcomes(1)
    assert first == await outcomes(1)
    assert first != await outcomes(2)
    counts = {outcome: first.count(outcome) for outcome in CommandOutcome}
    assert 30 <= counts[CommandOutcome.FAILED] <= 90
    assert 15 <= counts[CommandOutcome.TIMED_OUT] <= 70


async def test_plays_the_dcc_and_executes_its_schedules():
    async with Harness(DeviceConfig(failure_rate=1.0)) as run:
        schedule = await run.command("5.1", 7, fields={"DeviceID": ESME.device_id})
        await run.broker.drain()
        assert await run.simulator.execute_schedules() == 1
        await run.broker.drain()
    (dcc_topic, answer), (device_topic, execution) = run.up
    # The DCC answers forwarded non-device requests itself, and never fails them.
    assert dcc_topic == f"dsp/device/{DCC_EUI}/up"
    assert (answer.response_code, answer.request_id, answer.srv) == ("I0", schedule, "5.1")
    assert device_topic == f"dsp/device/{ESME.device_id}/up"
    assert execution.scheduled
    assert execution.srv == "4.6.1"
    assert execution.request_id == RequestId(SUPPLIER, ESME.device_id, 7)


async def test_alerts_carry_their_code_and_a_response_id():
    async with Harness(DeviceConfig(), devices=ESTATE.devices) as run:
        await run.simulator.emit_alert(ESME, "8F0A")
        await run.simulator.emit_alert(HUB, POWER_OUTAGE_DCC_ALERT)
        await run.broker.drain()
    (topic, billing), (hub_topic, outage) = run.up
    assert topic == f"dsp/device/{ESME.device_id}/up"
    assert (billing.kind, billing.alert_code, billing.response_code) == (
        DeviceMessageKind.DEVICE_ALERT,
        "8F0A",
        "I0",
    )
    assert b"<sr:ResponseID>" + f"{ESME.device_id}:{DCC_EUI}:1".encode() in billing.raw
    assert hub_topic == f"dsp/device/{HUB.device_id}/up"
    assert (outage.kind, outage.alert_code) == (DeviceMessageKind.DCC_ALERT, POWER_OUTAGE_DCC_ALERT)
    hub_mpan = next(
        d.mpxn for d in ESTATE.devices if d.comms_hub_id == HUB.device_id and d.device_type is DeviceType.ESME
    )
    assert f"<sr:MPxN>{hub_mpan}</sr:MPxN>".encode() in outage.raw
    assert [alert.alert_class for alert in run.simulator.sent_alerts] == [
        AlertClass.BILLING,
        AlertClass.POWER_OUTAGE,
    ]


async def test_alert_rate_and_mix_drive_the_alert_stream():
    mix = {AlertClass.SECURITY: 1.0, AlertClass.BILLING: 1.0}
    async with Harness(DeviceConfig(alert_rate=5.0, alert_mix=mix, seed=4), devices=ESTATE.devices) as run:
        sent = await run.simulator.run_alerts(asyncio.Event(), limit=40)
        await run.broker.drain()
    assert sent == 40
    assert len(run.up) == 40
    assert len(run.sleeps) == 40
    assert all(gap > 0 for gap in run.sleeps)
    classes = {alert.alert_class for alert in run.simulator.sent_alerts}
    assert classes == {AlertClass.SECURITY, AlertClass.BILLING}
    for (topic, message), alert in zip(run.up, run.simulator.sent_alerts, strict=True):
        assert message.alert_code in ALERT_CODES[alert.alert_class]
        assert topic == f"dsp/device/{alert.device}/up"


async def test_alerts_can_be_aimed_at_chosen_devices():
    chosen = [ESME, HUB]
    async with Harness(DeviceConfig(seed=8), devices=ESTATE.devices) as run:
        sent = await run.simulator.emit_alerts(30, chosen)
        await run.broker.drain()
    assert len(sent) == 30
    assert {alert.device for alert in sent} == {ESME.device_id, HUB.device_id}
    assert {message.alert_code for _, message in run.up} >= {"8F0A", POWER_OUTAGE_DCC_ALERT}


async def test_stopped_alert_loop_sends_nothing():
    stop = asyncio.Event()
    stop.set()
    async with Harness(DeviceConfig(alert_rate=100.0), devices=ESTATE.devices) as run:
        assert await run.simulator.run_alerts(stop) == 0


def test_rejects_impossible_shares():
    with pytest.raises(ValueError, match="at most 1"):
        DeviceConfig(failure_rate=0.7, timeout_rate=0.5)
    with pytest.raises(ValueError, match="negative"):
        DeviceConfig(latency_seconds=-1)
