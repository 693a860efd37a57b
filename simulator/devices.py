"""SMETS2 device endpoints (and the DCC's) on any Transport: answers, failures, timeouts, alerts.

`DeviceSimulator` subscribes to `dsp/device/+/cmd` and answers each command on
`dsp/device/<eui>/up` with a DUIS sr:Response (Header RequestID of the command, ResponseCode I0,
ResponseDateTime; Body ResponseMessage with ServiceReference and ServiceReferenceVariant) after a
configurable latency. A configurable share of device commands fails (E20) and another share is
never answered (the gateway's timeout answers those). Commands to the DCC's own EUI (forwarded
non-device requests, CommandVariant 8) are always answered I0; a 5.1 Create Schedule is remembered
so that `execute_schedules()` can later publish one DCC-scheduled execution per schedule from the
scheduled device, as the DCC would.

Alerts are emitted at a configurable rate across the simulated devices, mixed by class: security,
safety and supply, power outage (device alerts from ESMEs, DCC alert AD1 for a comms hub),
firmware, and 8F0A Billing Data Log Updated (the consumption-bearing one). Alert headers carry
ResponseID "<device-eui>:<dcc-eui>:<counter>".

A future-dated command (its Header carries ExecutionDateTime) of an SRV whose future-dated response
pattern is the device's (SRV matrix: "Device") is answered at once and, as the device executes it, by a
FutureDatedDeviceAlertMessage 8F66 carrying the command's RequestID, which the gateway routes to that
request's user.

Everything received is recorded (`received`) so a run can prove what reached a device. Clocks,
sleep and randomness are injected, so tests are deterministic.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import struct
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING

import structlog
from lxml import etree

from gateway.duis import ParseError, parse_request
from gateway.responses import response_xml
from rules.codes import ResponseCode
from rules.domain import DCC_EUI, DeviceType, Eui, RequestId, parse_eui
from rules.table import SRV_MATRIX

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from gateway.transport import Message, Transport
    from rules.domain import DeviceRecord

log = structlog.get_logger("mp169.simulator.devices")

SR_NAMESPACE = "http://www.dccinterface.co.uk/ServiceUserGateway"
_SR = f"{{{SR_NAMESPACE}}}"
CREATE_SCHEDULE_SRV = "5.1"


class AlertClass(StrEnum):
    SECURITY = "security"
    SAFETY = "safety"
    """Safety and supply."""
    POWER_OUTAGE = "power-outage"
    FIRMWARE = "firmware"
    BILLING = "billing"
    """8F0A Billing Data Log Updated: carries a billing snapshot (withheld from a flagged device)."""


def _codes(*spans: tuple[int, int]) -> tuple[str, ...]:
    return tuple(f"{code:04X}" for low, high in spans for code in range(low, high + 1))


ALERT_CODES: Mapping[AlertClass, tuple[str, ...]] = MappingProxyType(
    {
        AlertClass.SECURITY: _codes(
            (0x8F1E, 0x8F1E),
            (0x8F30, 0x8F30),
            (0x8F3D, 0x8F3F),
            (0x8F47, 0x8F4F),
            (0x8F53, 0x8F53),
            (0x8F60, 0x8F60),
            (0x8F70, 0x8F70),
            (0x8F73, 0x8F78),
        ),
        AlertClass.SAFETY: _codes(
            (0x8F32, 0x8F34), (0x8F83, 0x8F83), (0x81A0, 0x81A0), (0x81B4, 0x81B6), (0x81BD, 0x81C0)
        ),
        AlertClass.POWER_OUTAGE: _codes((0x8F35, 0x8F3C)),
        AlertClass.FIRMWARE: _codes((0x8F1B, 0x8F1C), (0x8F43, 0x8F43), (0x8F72, 0x8F72), (0x8F89, 0x8F8B)),
        AlertClass.BILLING: ("8F0A",),
    }
)
"""The GBCS alert codes each class emits (docs/mp169.md section 4, and the rules table)."""

POWER_OUTAGE_DCC_ALERT = "AD1"
"""DCC alert for a comms hub that lost power: sent to the network operator."""

ALERT_DEVICE_TYPES: Mapping[AlertClass, frozenset[DeviceType]] = MappingProxyType(
    {
        AlertClass.SECURITY: frozenset({DeviceType.ESME, DeviceType.GSME, DeviceType.CHF}),
        AlertClass.SAFETY: frozenset({DeviceType.ESME, DeviceType.GSME}),
        AlertClass.POWER_OUTAGE: frozenset({DeviceType.ESME, DeviceType.CHF}),
        AlertClass.FIRMWARE: frozenset({DeviceType.ESME, DeviceType.GSME, DeviceType.CHF, DeviceType.PPMID}),
        AlertClass.BILLING: frozenset({DeviceType.ESME, DeviceType.GSME}),
    }
)

DEFAULT_ALERT_MIX: Mapping[AlertClass, float] = MappingProxyType(
    {
        AlertClass.SECURITY: 0.3,
        AlertClass.SAFETY: 0.15,
        AlertClass.POWER_OUTAGE: 0.2,
        AlertClass.FIRMWARE: 0.1,
        AlertClass.BILLING: 0.25,
    }
)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    latency_seconds: float = 0.0
    """Delay before a device or the DCC answers a command."""
    failure_rate: float = 0.0
    """Share of device commands answered E20 (device failure)."""
    timeout_rate: float = 0.0
    """Share of device commands never answered."""
    alert_rate: float = 0.0
    """Alerts per second across all simulated devices (run_alerts)."""
    alert_mix: Mapping[AlertClass, float] = field(default_factory=lambda: DEFAULT_ALERT_MIX)
    dcc_alert_share: float = 0.3
    """Share of power-outage alerts that are the DCC's AD1 for a comms hub rather than a meter's own."""
    seed: int = 0
    dcc_eui: Eui = DCC_EUI
    devices_topic: str = "dsp/device"

    def __post_init__(self) -> None:
        if self.latency_seconds < 0 or self.alert_rate < 0:
            raise ValueError("latency and alert rate must not be negative")
        if not (
            self.failure_rate >= 0 and self.timeout_rate >= 0 and self.failure_rate + self.timeout_rate <= 1
        ):
            raise ValueError("failure_rate and timeout_rate must be shares adding up to at most 1")
        if not 0 <= self.dcc_alert_share <= 1 or any(weight < 0 for weight in self.alert_mix.values()):
            raise ValueError("alert shares and weights must not be negative (dcc_alert_share at most 1)")


class CommandOutcome(StrEnum):
    ANSWERED = "answered"
    FAILED = "failed"
    TIMED_OUT = "timed-out"
    UNPARSEABLE = "unparseable"


@dataclass(frozen=True, slots=True)
class ReceivedCommand:
    """A command that reached a device (or the DCC): the simulator's proof of delivery."""

    t: float
    device: Eui
    request_id: str | None
    srv: str | None
    outcome: CommandOutcome


@dataclass(frozen=True, slots=True)
class SentAlert:
    t: float
    device: Eui
    code: str
    alert_class: AlertClass | None
    """None for a code outside ALERT_CODES (emit_alert takes any code)."""


@dataclass(frozen=True, slots=True)
class Schedule:
    """A DCC schedule created by an accepted 5.1: which SRV runs for which device, for whom."""

    schedule_id: int
    request_id: RequestId
    device: Eui
    srv: str


# -- DUIS response XML --------------------------------------------------------------------------


def _timestamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _sub(parent: etree._Element, name: str, text: str | None = None) -> etree._Element:
    element = etree.SubElement(parent, _SR + name)
    if text is not None:
        element.text = text
    return element


def _alert_response(response_id: str, at: datetime) -> tuple[etree._Element, etree._Element]:
    """An alert's sr:Response (ResponseID, I0, ResponseDateTime); returns (root, Body)."""
    root = etree.Element(_SR + "Response", nsmap={"sr": SR_NAMESPACE})
    root.set("schemaVersion", "5.4")
    head = _sub(root, "Header")
    _sub(head, "ResponseID", response_id)
    _sub(head, "ResponseCode", ResponseCode.SUCCESS.value)
    _sub(head, "ResponseDateTime", _timestamp(at))
    return root, _sub(root, "Body")


def _document(root: etree._Element) -> bytes:
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8"))


def device_alert_xml(*, response_id: str, code: str, at: datetime, gbcs_payload: bytes) -> bytes:
    """A DeviceAlertMessage (GBCS alert code, payload base64)."""
    root, body = _alert_response(response_id, at)
    alert = _sub(body, "DeviceAlertMessage")
    _sub(alert, "AlertCode", code)
    _sub(alert, "GBCSPayload", base64.b64encode(gbcs_payload).decode("ascii"))
    return _document(root)


def power_outage_alert_xml(*, response_id: str, hub: Eui, mpxn: str, at: datetime) -> bytes:
    """The DCC's AD1 alert: a comms hub lost power."""
    root, body = _alert_response(response_id, at)
    message = _sub(body, "DCCAlertMessage")
    _sub(message, "DCCAlertCode", POWER_OUTAGE_DCC_ALERT)
    event = _sub(_sub(message, "DCCAlert"), "PowerOutageEvent")
    _sub(event, "CommsHubDeviceID", hub)
    _sub(event, "StartDateTime", _timestamp(at))
    _sub(event, "MPxN", mpxn)
    return _document(root)


def scheduled_execution_xml(*, schedule: Schedule, at: datetime, gbcs_payload: bytes) -> bytes:
    """A DCC-scheduled execution of `schedule`, as the scheduled device's response (DSPScheduledMessage)."""
    request_id = RequestId(schedule.request_id.originator, schedule.device, schedule.request_id.counter)
    content = (
        f"<sr:DSPScheduledMessage><sr:GBCSPayload>{base64.b64encode(gbcs_payload).decode('ascii')}"
        f"</sr:GBCSPayload><sr:DSPScheduleID>{schedule.schedule_id}</sr:DSPScheduleID></sr:DSPScheduledMessage>"
    )
    return response_xml(
        request_id=request_id,
        code=ResponseCode.SUCCESS,
        service_reference=None,
        srv=schedule.srv,
        at=at,
        payload=content.encode(),
    )


FUTURE_DATED_EXECUTED = "8F66"
_EXECUTION_DATE_TIME = b"ExecutionDateTime>"


def _device_future_dated_srvs() -> frozenset[str]:
    """SRVs whose future-dated execution the device itself reports (SRV matrix pattern Device)."""
    rows = json.loads(SRV_MATRIX.read_text(encoding="utf-8"))
    return frozenset(
        row["Service Reference Variant"] for row in rows if "Device" in row["Future Dated Response Pattern"]
    )


DEVICE_FUTURE_DATED_SRVS = _device_future_dated_srvs()


def future_dated_alert_xml(*, request_id: RequestId, srv: str, at: datetime, gbcs_payload: bytes) -> bytes:
    """The device's 8F66 (future-dated command executed) for `request_id`: a FutureDatedDeviceAlertMessage."""
    content = (
        f"<sr:FutureDatedDeviceAlertMessage><sr:FutureDatedAlertCode>{FUTURE_DATED_EXECUTED}"
        f"</sr:FutureDatedAlertCode><sr:GBCSPayload>{base64.b64encode(gbcs_payload).decode('ascii')}"
        "</sr:GBCSPayload><sr:InstructionNumber>1</sr:InstructionNumber>"
        "<sr:TotalCommandInstructions>1</sr:TotalCommandInstructions></sr:FutureDatedDeviceAlertMessage>"
    )
    return response_xml(
        request_id=request_id,
        code=ResponseCode.SUCCESS,
        service_reference=None,
        srv=srv,
        at=at,
        payload=content.encode(),
    )


def gbcs_payload_xml(gbcs_payload: bytes) -> bytes:
    """ResponseMessage content carrying a device's GBCS response."""
    return b"<sr:GBCSPayload>" + base64.b64encode(gbcs_payload) + b"</sr:GBCSPayload>"


def gbcs_stand_in(counter: int, code: str, at: datetime) -> bytes:
    """A stand-in GBCS frame (not real GBCS): 0x0F, a counter, the code's two bytes, UTC seconds."""
    code_value = int(code, 16) if len(code) == 4 else 0
    return struct.pack(">BIHQ", 0x0F, counter & 0xFFFFFFFF, code_value, int(at.timestamp()))


# -- the simulator ------------------------------------------------------------------------------


class DeviceSimulator:
    """Plays every device (and the DCC) behind `dsp/device/+/cmd` on one transport."""

    def __init__(  # noqa: PLR0913 - the transport, what to play, and the injected clocks
        self,
        transport: Transport,
        config: DeviceConfig | None = None,
        *,
        devices: Sequence[DeviceRecord] = (),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.transport = transport
        self.config = config or DeviceConfig()
        self.received: list[ReceivedCommand] = []
        self.sent_alerts: list[SentAlert] = []
        self.schedules: list[Schedule] = []
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        seed = self.config.seed
        # Separate streams: answering and alerting interleave differently run to run over MQTT.
        self._answer_rng = random.Random(f"mp169-devices:{seed}:answers")  # noqa: S311 - a simulation
        self._alert_rng = random.Random(f"mp169-devices:{seed}:alerts")  # noqa: S311 - a simulation
        self._alert_counter = 0
        self._by_class = {
            alert_class: [device for device in devices if device.device_type in types]
            for alert_class, types in ALERT_DEVICE_TYPES.items()
        }
        self._prefix = f"{self.config.devices_topic}/"
        # AD1 names the premise's import MPAN, which the inventory holds on the ESME, not the hub.
        self._hub_mpan = {
            device.comms_hub_id: device.mpxn
            for device in devices
            if device.device_type is DeviceType.ESME and device.comms_hub_id and device.mpxn
        }

    async def start(self) -> None:
        await self.transport.start([f"{self._prefix}+/cmd"], self._on_command)

    async def stop(self) -> None:
        """Stop taking commands; answers being prepared are still published."""
        await self.transport.stop()

    def up_topic(self, device: Eui) -> str:
        return f"{self._prefix}{device}/up"

    # -- commands --

    async def _on_command(self, message: Message) -> None:
        now = self._monotonic()
        try:
            device = parse_eui(message.topic[len(self._prefix) : -len("/cmd")])
        except ValueError:
            log.warning("command-on-bad-topic", topic=message.topic)
            return
        request = parse_request(message.payload)
        if isinstance(request, ParseError):
            request_id = str(request.request_id) if request.request_id else None
            self.received.append(ReceivedCommand(now, device, request_id, None, CommandOutcome.UNPARSEABLE))
            log.warning("unparseable-command", device=device, reason=request.reason)
            return
        outcome = self._outcome(device)
        self.received.append(ReceivedCommand(now, device, str(request.request_id), request.srv, outcome))
        if outcome is CommandOutcome.TIMED_OUT:
            return
        if self.config.latency_seconds:
            await self._sleep(self.config.latency_seconds)
        at = self._clock()
        if outcome is CommandOutcome.FAILED:
            code, payload = ResponseCode.DEVICE_FAILURE, None
        else:
            code, payload = (
                ResponseCode.SUCCESS,
                gbcs_payload_xml(gbcs_stand_in(request.request_id.counter, "0000", at)),
            )
        if device == self.config.dcc_eui:
            payload = None
            self._remember_schedule(
                request.request_id, request.srv, request.scheduled_srv, request.concerned_devices
            )
        answer = response_xml(
            request_id=request.request_id,
            code=code,
            service_reference=request.service_reference,
            srv=request.srv,
            at=at,
            payload=payload,
        )
        await self.transport.publish(self.up_topic(device), answer)
        if (
            outcome is CommandOutcome.ANSWERED
            and request.srv in DEVICE_FUTURE_DATED_SRVS
            and _EXECUTION_DATE_TIME in message.payload
        ):
            executed = future_dated_alert_xml(
                request_id=request.request_id,
                srv=request.srv,
                at=at,
                gbcs_payload=gbcs_stand_in(request.request_id.counter, FUTURE_DATED_EXECUTED, at),
            )
            await self.transport.publish(self.up_topic(device), executed)

    def _outcome(self, device: Eui) -> CommandOutcome:
        if device == self.config.dcc_eui:
            return CommandOutcome.ANSWERED
        draw = self._answer_rng.random()
        if draw < self.config.timeout_rate:
            return CommandOutcome.TIMED_OUT
        if draw < self.config.timeout_rate + self.config.failure_rate:
            return CommandOutcome.FAILED
        return CommandOutcome.ANSWERED

    def _remember_schedule(
        self, request_id: RequestId, srv: str, scheduled_srv: str | None, devices: Sequence[Eui]
    ) -> None:
        if srv == CREATE_SCHEDULE_SRV and scheduled_srv is not None and devices:
            self.schedules.append(Schedule(len(self.schedules) + 1, request_id, devices[0], scheduled_srv))

    async def execute_schedules(self) -> int:
        """Publish one DCC-scheduled execution per schedule created so far; returns how many."""
        at = self._clock()
        for schedule in self.schedules:
            payload = gbcs_stand_in(schedule.schedule_id, "0000", at)
            answer = scheduled_execution_xml(schedule=schedule, at=at, gbcs_payload=payload)
            await self.transport.publish(self.up_topic(schedule.device), answer)
        return len(self.schedules)

    # -- alerts --

    async def emit_alert(self, device: DeviceRecord, code: str) -> SentAlert:
        """Publish one alert from `device` (a GBCS code, or AD1 for a comms hub's power outage)."""
        self._alert_counter += 1
        at = self._clock()
        response_id = f"{device.device_id}:{self.config.dcc_eui}:{self._alert_counter}"
        if code == POWER_OUTAGE_DCC_ALERT:
            payload = power_outage_alert_xml(
                response_id=response_id,
                hub=device.device_id,
                mpxn=self._hub_mpan.get(device.device_id, "0"),
                at=at,
            )
        else:
            payload = device_alert_xml(
                response_id=response_id,
                code=code,
                at=at,
                gbcs_payload=gbcs_stand_in(self._alert_counter, code, at),
            )
        await self.transport.publish(self.up_topic(device.device_id), payload)
        sent = SentAlert(self._monotonic(), device.device_id, code, _class_of(code))
        self.sent_alerts.append(sent)
        return sent

    async def emit_random_alert(self, devices: Sequence[DeviceRecord] | None = None) -> SentAlert | None:
        """One alert of a class drawn from the mix, from a device of that class (of `devices` if given)."""
        rng = self._alert_rng
        mix = self.config.alert_mix
        classes = [c for c in AlertClass if mix.get(c, 0) > 0 and self._candidates(c, devices)]
        if not classes:
            return None
        alert_class = rng.choices(classes, weights=[mix[c] for c in classes])[0]
        candidates = self._candidates(alert_class, devices)
        hubs = [device for device in candidates if device.device_type is DeviceType.CHF]
        meters = [device for device in candidates if device.device_type is not DeviceType.CHF]
        if alert_class is AlertClass.POWER_OUTAGE and hubs:
            # The DCC raises AD1 for a hub that lost power; meters raise their own outage alerts.
            if not meters or rng.random() < self.config.dcc_alert_share:
                return await self.emit_alert(rng.choice(hubs), POWER_OUTAGE_DCC_ALERT)
            candidates = meters
        return await self.emit_alert(rng.choice(candidates), rng.choice(ALERT_CODES[alert_class]))

    async def emit_alerts(self, count: int, devices: Sequence[DeviceRecord] | None = None) -> list[SentAlert]:
        """`count` alerts drawn from the mix, at once (the demo aims some at flagged devices)."""
        sent = []
        for _ in range(count):
            alert = await self.emit_random_alert(devices)
            if alert is None:
                break
            sent.append(alert)
        return sent

    def _candidates(
        self, alert_class: AlertClass, devices: Sequence[DeviceRecord] | None
    ) -> list[DeviceRecord]:
        if devices is None:
            return self._by_class[alert_class]
        types = ALERT_DEVICE_TYPES[alert_class]
        return [device for device in devices if device.device_type in types]

    async def run_alerts(self, stop: asyncio.Event, *, limit: int | None = None) -> int:
        """Emit alerts at config.alert_rate (exponential gaps) until `stop` is set or `limit` is reached."""
        sent = 0
        rate = self.config.alert_rate
        while rate > 0 and not stop.is_set() and (limit is None or sent < limit):
            await self._sleep(self._alert_rng.expovariate(rate))
            if stop.is_set() or await self.emit_random_alert() is None:
                break
            sent += 1
        return sent


def _class_of(code: str) -> AlertClass | None:
    if code == POWER_OUTAGE_DCC_ALERT:
        return AlertClass.POWER_OUTAGE
    return next((alert_class for alert_class, codes in ALERT_CODES.items() if code in codes), None)
