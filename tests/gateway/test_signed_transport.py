"""SigningTransport: documents to users leave signed with the DSP key; nothing else is touched."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.config import SigningSettings
from gateway.responses import response_xml
from gateway.signed_transport import SigningTransport
from gateway.signing import CertificateLibrary, dsp_credentials, verify
from gateway.transport import MemoryBroker, MemoryTransport, Message

KEY, CERTIFICATE = dsp_credentials(SigningSettings())
ANSWER = response_xml(request_id=None, code="I0", service_reference=None, srv="4.8.1", at=datetime.now(UTC))


async def test_what_goes_to_users_is_signed_and_the_rest_passes_unchanged() -> None:
    broker = MemoryBroker()
    received: list[Message] = []

    async def collect(message: Message) -> None:
        received.append(message)

    observer = MemoryTransport(broker, "observer")
    await observer.start(["dsp/#"], collect)
    gateway = SigningTransport(MemoryTransport(broker, "gateway"), KEY, CERTIFICATE, outbound="dsp/out")
    await gateway.start([], collect)
    await gateway.publish("dsp/out/90-B3-D5-1F-30-01-00-00", ANSWER)
    await gateway.publish("dsp/device/00-DB-12-34-56-78-90-A0/cmd", ANSWER)
    await gateway.publish("dsp/outbound-elsewhere/x", ANSWER)
    await gateway.publish("dsp/out/90-B3-D5-1F-30-01-00-00", b"<not-xml")
    await broker.drain()
    await gateway.stop()
    await observer.stop()
    signed, command, elsewhere, garbage = (message.payload for message in received)
    verification = verify(signed, CertificateLibrary([CERTIFICATE]))
    assert (verification.valid, verification.signer) == (True, "90-B3-D5-1F-30-00-00-02")
    assert command == elsewhere == ANSWER
    assert garbage == b"<not-xml"
    assert gateway.unsigned == 1
