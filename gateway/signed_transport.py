"""A Transport that signs every document it publishes to users with the DSP's key, as DCC signs its own.

It wraps any Transport (MQTT or in memory): publishes under the outbound prefix (`dsp/out/<user>`) are
signed with `gateway.signing.sign` on the way out; commands to devices and dead letters pass unchanged.
A payload that is not well-formed XML cannot be signed: it is published as it is and counted (the
gateway only publishes documents it built or relayed after parsing them, so the count stays zero).
Signing is synchronous CPU work on the publishing task (bench/signing.py measures it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from gateway.signing import OrgCertificate, SigningKey, sign

if TYPE_CHECKING:
    from collections.abc import Sequence

    from gateway.transport import Handler, Transport

log = structlog.get_logger("mp169.signing")


class SigningTransport:
    def __init__(
        self, inner: Transport, key: SigningKey, certificate: OrgCertificate, *, outbound: str
    ) -> None:
        self.inner = inner
        self._key = key
        self._certificate = certificate
        self._prefix = f"{outbound}/"
        self.unsigned = 0
        """Documents to users published unsigned because they were not well-formed."""

    async def start(self, subscriptions: Sequence[str], handler: Handler) -> None:
        await self.inner.start(subscriptions, handler)

    async def publish(self, topic: str, payload: bytes) -> None:
        if topic.startswith(self._prefix):
            try:
                payload = sign(payload, self._key, self._certificate)
            except ValueError as exc:
                self.unsigned += 1
                log.warning("published-unsigned", topic=topic, detail=str(exc))
        await self.inner.publish(topic, payload)

    async def stop(self) -> None:
        await self.inner.stop()
