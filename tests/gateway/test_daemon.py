"""The gateway on a real Mosquitto: users, the gateway and the devices as separate MQTT clients.

In-process tests run `GatewayService` on an `MqttTransport`; the crash test runs `mp169 run` as a
child process and SIGKILLs it mid-stream. Waiting is event-driven (GUARD_SECONDS only turns a hang
into a failure). The users hold keys from a fresh test PKI and sign what they send, as DCC users do;
the gateway verifies against that PKI's certificates and signs its answers with its DSP key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from gateway.config import Settings
from gateway.mqtt import MqttTransport
from gateway.pki import PkiLayout, init_pki
from gateway.service import GatewayService
from gateway.signing import CertificateLibrary, OrgCertificate, sign, verify
from rules.codes import ResponseCode
from rules.domain import DCC_EUI
from simulator.devices import DeviceConfig, DeviceSimulator
from simulator.replay import Signatures
from tests.gateway.messages import CONSUMPTION_SRV, SECURITY_SRV, flag_request, header, request
from tests.gateway.test_inventory import GAS_SUPPLIER, IMPORT_SUPPLIER, METER, USERS
from tests.gateway.test_mqtt import GUARD_SECONDS, Inbox, settings_for
from tests.gateway.test_shell import seed

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from gateway.transport import Message
    from rules.domain import Eui
    from simulator.mosquitto import Mosquitto

pytestmark = pytest.mark.broker


class Answers(Inbox):
    """Responses on dsp/out/<user>, indexed by RequestID."""

    def __init__(self) -> None:
        super().__init__()
        self._codes: defaultdict[str | None, list[str | None]] = defaultdict(list)

    async def __call__(self, message: Message) -> None:
        request_id, code = header(message.payload)
        self._codes[request_id].append(code)
        await super().__call__(message)

    def codes(self, request_id: str) -> list[str]:
        return list(self._codes.get(request_id, ()))

    async def until_answered(self, request_id: str, count: int = 1) -> list[str]:
        await self.until(lambda _: len(self.codes(request_id)) >= count)
        return self.codes(request_id)


@dataclass
class Estate:
    answers: Answers
    user: MqttTransport
    devices: DeviceSimulator
    url: str
    pki: PkiLayout
    signatures: Signatures

    async def send(self, user: Eui, payload: bytes, *, signer: Eui | None = None) -> None:
        """Publish on `user`'s topic, signed by `signer` (default: `user`); `raw` sends as it is."""
        key, certificate = self.signatures.users[signer or user]
        await self.raw(user, sign(payload, key, certificate))

    async def raw(self, user: Eui, payload: bytes) -> None:
        await self.user.publish(f"dsp/in/{user}", payload)


@pytest.fixture
async def estate(mosquitto: Mosquitto, tmp_path: Path) -> AsyncIterator[Estate]:
    pki = init_pki(tmp_path / "pki", [user.user_id for user in USERS])
    answers = Answers()
    user = MqttTransport(settings_for(mosquitto.url), "test-users")
    await user.start(["dsp/out/+"], answers)
    devices = DeviceSimulator(MqttTransport(settings_for(mosquitto.url), "test-devices"), DeviceConfig())
    await devices.start()
    yield Estate(answers, user, devices, mosquitto.url, pki, Signatures.from_pki(pki))
    await devices.transport.abort()
    await user.abort()


def signing_settings(pki: PkiLayout) -> dict[str, str]:
    return {
        "certificates": str(pki.certificates),
        "dsp_key": str(pki.key(DCC_EUI)),
        "dsp_certificate": str(pki.certificate(DCC_EUI)),
    }


def gateway_settings(url: str, store: Path, pki: PkiLayout, **gateway: object) -> Settings:
    return Settings.model_validate(
        {
            "broker": {"url": url, "reconnect_min_seconds": 0.05, "reconnect_max_seconds": 0.5},
            "store": {"path": str(store)},
            "gateway": {"metrics_port": 0, **gateway},
            "signing": signing_settings(pki),
        }
    )


@pytest.fixture
async def service(tmp_path: Path, estate: Estate) -> AsyncIterator[GatewayService]:
    await seed(tmp_path / "gw.sqlite3")
    settings = gateway_settings(estate.url, tmp_path / "gw.sqlite3", estate.pki)
    transport = MqttTransport(settings.broker, settings.gateway.client_id)
    running = await GatewayService.start(settings, transport)
    yield running
    await running.stop()


def counter_of(request_id: str | None) -> int:
    assert request_id is not None
    return int(request_id.rsplit(":", 1)[1])


def rid(originator: Eui, target: Eui, counter: int) -> str:
    return f"{originator}:{target}:{counter}"


async def test_requests_are_forwarded_answered_and_refused_over_mqtt(
    estate: Estate, service: GatewayService
) -> None:
    await estate.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1))
    # The gateway's acknowledgement, then the device's own answer relayed back.
    codes = await estate.answers.until_answered(rid(IMPORT_SUPPLIER, METER, 1), 2)
    assert codes == [ResponseCode.ACKNOWLEDGED, ResponseCode.SUCCESS]

    await estate.send(IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 2, METER, set_flag=True))
    flag_rid = rid(IMPORT_SUPPLIER, service.dcc_eui, 2)
    assert await estate.answers.until_answered(flag_rid) == [ResponseCode.SUCCESS]

    await estate.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 3))
    await estate.send(IMPORT_SUPPLIER, request(SECURITY_SRV, IMPORT_SUPPLIER, METER, 4))
    assert await estate.answers.until_answered(rid(IMPORT_SUPPLIER, METER, 3)) == [
        ResponseCode.CONSUMER_CHOICE
    ]
    assert await estate.answers.until_answered(rid(IMPORT_SUPPLIER, METER, 4), 2) == [
        ResponseCode.ACKNOWLEDGED,
        ResponseCode.SUCCESS,
    ]
    # Only the read before the flag and the security update reached the meter.
    assert [counter_of(command.request_id) for command in estate.devices.received] == [1, 4]


async def test_a_spoofed_originator_never_reaches_the_device(estate: Estate, service: GatewayService) -> None:
    # The originator's own signed request, replayed on another user's topic.
    await estate.send(
        GAS_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1), signer=IMPORT_SUPPLIER
    )
    await estate.answers.until(lambda messages: len(messages) == 1)
    [message] = estate.answers.messages
    assert message.topic == f"dsp/out/{GAS_SUPPLIER}"
    assert header(message.payload)[1] == ResponseCode.ORIGINATOR_MISMATCH
    # A later request on the same path is answered after it: nothing was forwarded in between.
    await estate.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 2))
    await estate.answers.until_answered(rid(IMPORT_SUPPLIER, METER, 2), 2)
    assert [counter_of(command.request_id) for command in estate.devices.received] == [2]


async def test_garbage_goes_to_the_dead_letter_topic(estate: Estate, service: GatewayService) -> None:
    letters = Inbox()
    watcher = MqttTransport(settings_for(estate.url), "test-deadletters")
    await watcher.start(["dsp/deadletter"], letters)
    try:
        await estate.raw(IMPORT_SUPPLIER, b"<unclosed")
        await letters.until(lambda messages: len(messages) == 1)
        assert b'"reason": "not-well-formed"' in letters.payloads[0]
        # No RequestID, so no valid answer: the next answer on the user's topic is the next request's.
        await estate.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1))
        await estate.answers.until(lambda messages: len(messages) == 1)
        assert header(estate.answers.payloads[0]) == (
            rid(IMPORT_SUPPLIER, METER, 1),
            ResponseCode.ACKNOWLEDGED,
        )
    finally:
        await watcher.abort()


async def test_every_request_is_answered_across_a_broker_restart(
    mosquitto: Mosquitto, estate: Estate, service: GatewayService
) -> None:
    for counter in range(1, 51):
        await estate.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, counter))
    await asyncio.to_thread(mosquitto.restart)
    for counter in range(51, 101):
        await estate.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, counter))
    for counter in range(1, 101):
        codes = await estate.answers.until_answered(rid(IMPORT_SUPPLIER, METER, counter))
        assert ResponseCode.DUPLICATE_REQUEST_ID not in codes


async def test_unsigned_and_wrongly_signed_requests_are_refused_end_to_end(
    estate: Estate, service: GatewayService
) -> None:
    read = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1)
    await estate.raw(IMPORT_SUPPLIER, read)  # the template's placeholder signature: no such certificate
    await estate.raw(IMPORT_SUPPLIER, strip_signature(request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 2)))
    await estate.send(
        IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 3), signer=GAS_SUPPLIER
    )
    signed = sign(
        request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 4), *estate.signatures.users[IMPORT_SUPPLIER]
    )
    await estate.raw(IMPORT_SUPPLIER, signed.replace(b":4<", b":5<"))  # tampered after signing
    # An unsigned flag-set changes nothing: the read after it is forwarded.
    await estate.raw(IMPORT_SUPPLIER, strip_signature(flag_request(IMPORT_SUPPLIER, 6, METER, set_flag=True)))
    await estate.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 7))
    expected = {
        1: ResponseCode.CERTIFICATE_UNKNOWN,
        2: ResponseCode.SIGNATURE_MISSING,
        3: ResponseCode.SIGNER_NOT_ORIGINATOR,
        5: ResponseCode.SIGNATURE_INVALID,
    }
    for counter, code in expected.items():
        assert await estate.answers.until_answered(rid(IMPORT_SUPPLIER, METER, counter)) == [code]
    assert await estate.answers.until_answered(rid(IMPORT_SUPPLIER, service.dcc_eui, 6)) == [
        ResponseCode.SIGNATURE_MISSING
    ]
    assert await estate.answers.until_answered(rid(IMPORT_SUPPLIER, METER, 7), 2) == [
        ResponseCode.ACKNOWLEDGED,
        ResponseCode.SUCCESS,
    ]
    assert [counter_of(command.request_id) for command in estate.devices.received] == [7]
    assert not service.view.is_flagged(METER)
    # Every answer is the gateway's, signed with its DSP key.
    dsp = CertificateLibrary([OrgCertificate.from_pem(estate.pki.certificate(DCC_EUI).read_bytes())])
    assert {verify(payload, dsp).reason for payload in estate.answers.payloads} == {"verified"}


def strip_signature(payload: bytes) -> bytes:
    stripped = re.sub(rb"(?s)<ds:Signature.*</ds:Signature>", b"", payload)
    assert stripped != payload
    return stripped


class Daemon:
    """`mp169 run` as a child process; ready once it logged daemon-ready."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.process: asyncio.subprocess.Process | None = None
        self.log: list[str] = []

    async def start(self, ready: bytes = b"daemon-ready") -> None:
        """Start; return once a log line contains `ready`."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "run",
            "--config",
            str(self.config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._logged = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        await self.until_logged(ready)

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.log.append(line.decode(errors="replace"))
            self._logged.set()
        self._logged.set()

    async def until_logged(self, text: bytes) -> None:
        """Wait for a log line containing `text`; fails if the daemon exits first."""
        wanted = text.decode()
        async with asyncio.timeout(GUARD_SECONDS):
            while not any(wanted in line for line in self.log):
                if self._reader.done():
                    raise RuntimeError(f"daemon exited before it logged {wanted}:\n" + "".join(self.log))
                self._logged.clear()
                await self._logged.wait()

    async def signal(self, signum: signal.Signals) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        async with asyncio.timeout(GUARD_SECONDS):
            code = await self.process.wait()
            await self._reader
        return code


async def test_a_killed_daemon_loses_no_acknowledged_request(
    tmp_path: Path, mosquitto: Mosquitto, estate: Estate
) -> None:
    await seed(tmp_path / "gw.sqlite3")
    config = tmp_path / "config.toml"
    signing = "".join(f'{key} = "{value}"\n' for key, value in signing_settings(estate.pki).items())
    config.write_text(
        f'[broker]\nurl = "{mosquitto.url}"\nreconnect_min_seconds = 0.05\nreconnect_max_seconds = 0.5\n'
        f'[store]\npath = "{tmp_path / "gw.sqlite3"}"\n'
        # Every request is forwarded: none is refused for the forward limit (tests/gateway/test_faults.py).
        "[gateway]\nmetrics_port = 0\nmax_forwards_per_user = 3000\ntarget_response_seconds = 5.0\n"
        f"[signing]\n{signing}"
    )
    daemon = Daemon(config)
    await daemon.start()
    total = 3000
    try:
        for counter in range(1, total + 1):
            await estate.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, counter))
        # Some requests answered, hundreds in flight at the gateway or queued at the broker: crash now.
        await estate.answers.until(lambda messages: len(messages) >= 100)
        assert await daemon.signal(signal.SIGKILL) == -signal.SIGKILL
        restarted = Daemon(config)
        await restarted.start()
        ids = [rid(IMPORT_SUPPLIER, METER, counter) for counter in range(1, total + 1)]
        finals = {ResponseCode.SUCCESS, ResponseCode.DEVICE_TIMEOUT}
        try:
            # Every request gets a final answer: the meter's, or E21 (its command never left, or the
            # meter's answer came after the target time).
            await estate.answers.until(lambda _: all(finals & set(estate.answers.codes(i)) for i in ids))
            for request_id in ids:  # never mistaken for a duplicate of itself
                assert ResponseCode.DUPLICATE_REQUEST_ID not in estate.answers.codes(request_id), request_id
        finally:
            assert await restarted.signal(signal.SIGTERM) == 0
    finally:
        if daemon.process is not None and daemon.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                daemon.process.kill()
    # At most once to the meter, whichever process forwarded it; one that never reached it got its E21.
    reached = Counter(counter_of(command.request_id) for command in estate.devices.received)
    assert [counter for counter, copies in reached.items() if copies > 1] == []
    unsent = [i for counter, i in enumerate(ids, start=1) if counter not in reached]
    assert all(ResponseCode.DEVICE_TIMEOUT in estate.answers.codes(i) for i in unsent)
    assert len(reached) > total // 2, "most commands should have reached the meter"
